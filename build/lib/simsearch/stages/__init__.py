"""One module per command, each a plain function of the config: extract, index, evaluate, search, duplicates,
map, finetune, compare, serve."""
