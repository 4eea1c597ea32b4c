"""`simsearch --help`, as a newcomer reads it: every name of the command and dataset tables stands apart
from its description, a plugin's long name too."""

import subprocess
import sys


def test_every_table_name_stands_apart_from_its_description():
    out = subprocess.run([sys.executable, "-m", "simsearch", "--help"], capture_output=True, text=True, check=True).stdout
    commands = out.split("commands:\n")[1].split("\n\n")[0].splitlines()
    datasets = out.split("datasets (data=NAME):\n")[1].split("\n\n")[0].splitlines()
    assert "fashion_mnist" in "\n".join(datasets)
    for line in commands + datasets:
        name = line.split()[0]
        assert line.startswith(f"  {name}  "), line
    starts = {len(line) - len(line[2:].split(maxsplit=1)[1]) for line in commands + datasets}
    assert len(starts) == 1, "the descriptions do not start in one column"
