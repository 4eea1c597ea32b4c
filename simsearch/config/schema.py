"""The typed schema: every key, its default and the reason for it. The YAML presets only choose values."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class RunConfig:
    dir: str = "outputs/${data.name}-${data.split}"  # every output of a run lands here
    seed: int = 0  # seeds random weights, samplers and index training: runs repeat exactly


@dataclass
class DataConfig:
    name: str = "synthetic"  # a registered dataset (`simsearch --help` lists them): cifar10, fashion_mnist, folder...
    root: str | None = None  # where the files are (or go, for downloads)
    split: str = "test"  # train | test (datasets only); inshop: train | query | gallery
    limit: int | None = None  # keep the first N items only
    download: bool = False  # cifar10, cub200: fetch the archive when it is not in `root`
    labels: str = "folder"  # folder: top-level folder name is the label; none: no labels
    decode: str = "auto"  # folders' JPEGs: device (torchvision.io.decode_jpeg on the GPU) | loader (PIL in workers) | auto
    # data=hf and data=webdataset (null: the format's default)
    hub: str | None = None  # data=hf: a dataset of the Hugging Face hub (online), instead of data.root
    image_column: str | None = None  # hf: the Image column (image) | webdataset: extensions tried in turn (jpg;png;webp)
    label_column: str | None = None  # hf: label (ClassLabel names the classes) | webdataset: cls
    key_column: str | None = None  # hf: a column of unique item keys (default: the row index)
    urls: Any = None  # webdataset: tar shards, a brace pattern (shards/train-{000000..000009}.tar) or a list
    batch_size: int = 64  # images per step and device
    num_workers: int = 2  # DataLoader worker processes per device
    # a catalogue (.csv, .parquet, .jsonl), one row per item, kept in the store as metadata.jsonl and returned with
    # every result; a changed row needs no new embedding (docs/recommendation.md)
    metadata: str | None = None
    metadata_key: str | None = None  # the catalogue's key column: id | path | index; None: the first of these it has
    # synthetic only: clustered random images, for tests
    num_items: int = 64
    num_classes: int = 4
    native_size_px: int = 32


@dataclass
class ModelConfig:
    name: str = "resnet50"  # any torchvision classification model, timm/<name>, pixels, or <family>/<name> of a registered family
    weights: str = "imagenet"  # imagenet (the library's default pretrained) | imagenet_v1 | random (seeded) | a state-dict path
    # null: the backbone's own, from its library's pretrained metadata (torchvision weights' transforms, timm's
    # pretrained_cfg); a value overrides it. The resolved values are recorded in every manifest and checkpoint.
    image_size: int | None = None  # pixels per side fed to the network (the whole image is resized, no crop)
    mean: list[float] | None = None  # per-channel normalisation, in [0, 1] units
    std: list[float] | None = None
    interpolation: str | None = None  # bilinear | bicubic (antialiased)
    checkpoint: str | None = None  # a fine-tuned checkpoint (backbone + head, self-describing), see `simsearch finetune`
    channels_last: bool = True  # NHWC convolutions: faster on GPU, and on CPU with oneDNN
    compile: bool = False  # torch.compile the network (GPU, long runs)
    # auto: frozen on a CPU (TorchScript, batch norm folded into the convolutions, oneDNN; 2-3x eager), eager on a
    # GPU | frozen | eager. A backbone that cannot be frozen runs eagerly, with the reason logged.
    inference: str = "auto"


@dataclass
class TrainerConfig:
    accelerator: str = "auto"  # auto | cpu | gpu
    devices: Any = 1  # an int, a list of ids or "auto"
    num_nodes: int = 1
    strategy: str = "auto"  # auto picks DDP for several devices
    # None: bf16-mixed on a GPU, fp32 on a CPU (bf16 on a CPU was measured below the 0.999 cosine to fp32 a store
    # needs: docs/backbones.md); bf16-mixed asks for it anyway. Part of the store's fingerprint, used again by queries
    precision: str | None = None
    enable_progress_bar: bool = True


@dataclass
class StoreConfig:
    dtype: str = "float32"  # float32 | float16 (half the disk, ~1e-3 cosine error)


@dataclass
class IndexConfig:
    # faiss: an index file beside the store, searched in this process | milvus: a Milvus collection (Milvus Lite in a
    # local file, or a Milvus server / cluster), kept in step with the store by `simsearch index` (docs/recommendation.md)
    backend: str = "faiss"
    uri: str | None = None  # milvus: a .db file (Milvus Lite) or http://host:19530; None: milvus.db in run.dir
    collection: str | None = None  # milvus: the collection's name; None: simsearch_<run.dir name>_<hash of its path>
    factory: str = "Flat"  # any FAISS index_factory string: Flat (exact), IVF1024,Flat, IVF1024,PQ64, HNSW32
    search_params: str = ""  # FAISS ParameterSpace string, e.g. "nprobe=32" or "efSearch=128"
    train_size: int = 100_000  # vectors sampled to train indexes that need training
    device: str = "auto"  # auto: every visible GPU if faiss has GPU support, else CPU | cpu | gpu
    gpu_sharded: bool = False  # several GPUs: shard the vectors (True) or replicate the index (False)
    batch_size: int = 4096  # queries per search call


@dataclass
class EvalConfig:
    k: list[int] = field(default_factory=lambda: [1, 5, 10, 20, 100])
    # k-NN classification accuracy (DINO/DINOv2's protocol: test queries against the train split as gallery)
    knn_k: list[int] = field(default_factory=lambda: [10, 20, 100, 200])  # DINOv2's K; [] computes none
    knn_weights: str = "exp"  # exp: exp(cosine / T), DINOv2's vote | uniform: majority | distance: 1 / (1 - cosine)
    knn_temperature: float = 0.07  # T of the exp vote (DINOv2's 0.07)
    backend: str = "exact"  # exact: blocked brute force (numpy on a CPU, torch on GPUs) | index: the run's FAISS index
    gallery: str | None = None  # a second store's run dir: run.dir's items are queries against it; None: leave-one-out
    queries: int | None = None  # a seeded sample (run.seed) of N queries, every item still in the gallery; None: all
    query_chunk: int = 1024  # queries scored at once: memory is query_chunk x block_rows, never N x N
    block_rows: int = 16_384  # store rows read (from disk, not mapped) and scored at once: 64 MB of scores a chunk
    device: str = "auto"  # auto: every visible GPU, else CPU | cpu | cuda | a list, e.g. cuda:0,cuda:1
    filter: str | None = None  # evaluate within the items a filter keeps (queries and gallery), e.g. "label == 'dress'"


@dataclass
class SearchConfig:
    query: str | None = None  # a row number, an item id, or a path to a new image
    k: int = 10
    grid: str = "recommendations.png"  # written in run.dir
    filter: str | None = None  # e.g. "category == 'dress' and price < 50": the top k among matching items only


@dataclass
class DuplicatesConfig:
    # cosine at or above which two items are near-duplicates; None: the measured default for the store's
    # weights (simsearch.duplicates.DEFAULT_THRESHOLDS, measured by scripts/duplicate_threshold.py, README)
    threshold: float | None = None
    k: int = 10  # neighbours looked at per item (index top-k, never N x N); larger groups join through chains
    against: str | None = None  # another run.dir: items of this store with a near-duplicate there (leakage)
    output: str = "duplicates.json"  # in run.dir: a list of groups, each a list of item ids
    image: str = "duplicates.png"  # in run.dir: the first `show_groups` groups side by side
    show_groups: int = 8


@dataclass
class MapConfig:
    method: str = "umap"  # umap (umap-learn) | tsne (scikit-learn)
    max_items: int = 20_000  # a larger store is subsampled, seeded by run.seed (UMAP of 1e5 took 4.7 min on 2 CPU cores)
    neighbours: int = 15  # UMAP n_neighbors / t-SNE perplexity: the size of the neighbourhoods kept
    thumbnails: int = 0  # draw this many items as small images at their place on the map (0: points only)
    image: str = "embedding_map.png"  # written in run.dir


@dataclass
class FinetuneConfig:
    # supcon (labels) | triplet (labels) | simclr, byol (label-free, lightly; ntxent: simclr's other name).
    # supcon: on frozen ImageNet Lite0 features it gained +0.096 P@10 in `compare` where triplet+batch_hard gained
    # +0.045 and collapsed (mean pairwise cosine > 0.95); docs/RESULTS.md has the measurements
    loss: str = "supcon"
    miner: str = "batch_hard"  # triplet only: batch_hard | semi_hard
    margin: float = 0.2  # triplet margin, in cosine similarity
    temperature: float = 0.1  # supcon and simclr: pytorch-metric-learning's default for supcon; 0.05 measured no better
    dim: int = 128  # size of the fine-tuned embedding
    hidden_dim: int = 512
    unfreeze: int = 0  # 0: frozen backbone, features cached once (CPU-friendly); N: the backbone's last N stages/blocks train too
    epochs: int = 20  # the supcon head's validation MAP@R levels off by epoch ~7 on Fashion-MNIST (a 40-epoch run)
    lr: float = 1e-3  # head; measured against 3e-3 (worse) and 3e-4 (equal within noise) on frozen Lite0 features
    # unfrozen stages: the top one; each group below gets layer_decay times the one above. End to end on Fashion-MNIST
    # (Lite0, 32 px; docs/RESULTS.md): 3e-4 with a warm-up; 1e-3 led in 3-epoch pilots but collapsed in a full run
    backbone_lr: float = 3e-4
    layer_decay: float = 1.0  # 1: every unfrozen stage at backbone_lr; 0.7: lower stages move less (layer-wise lr decay)
    warmup_epochs: float = 1.0  # linear warm-up of every learning rate over this many epochs, then cosine decay by step
    # frozen: the unfrozen stages' batch norms keep their ImageNet statistics (their scale and shift train) | train:
    # their statistics follow the fine-tuning batches. Frozen stages never update theirs. Measured: docs/RESULTS.md
    batch_norm: str = "frozen"
    # end to end: the random crop keeps at least this share of the image's area (1: no crop, flips only);
    # None: 0.6 for a supervised loss, lightly's 0.08 for a label-free method's views
    crop_scale: float | None = None
    colour: float | None = None  # label-free views: colour jitter's strength (1: lightly's, 0: none, greyscale too); None: 1
    blur: float | None = None  # label-free views: probability of a Gaussian blur; None: the method's (lightly's)
    momentum: float = 0.99  # byol: the teacher's EMA momentum at the start, cosine to 1 (lightly's 0.996 is for 100+ epochs)
    ssl_dim: int = 256  # label-free methods' projection output (BYOL's 256); dropped after training
    init_head: str | None = None  # a head-only checkpoint of the same backbone: end to end starts from its trained head
    weight_decay: float = 1e-4
    batch_size: int = 128
    m_per_class: int = 16  # class-balanced batches for the supervised losses: m images of each of batch/m classes
    views: int = 2  # label-free loss, frozen backbone: augmented views cached per image; each step draws two of them
    val_fraction: float = 0.1  # of the train split, held out for model selection; the test split is never read
    # what keeps a checkpoint: val/map@r | val/precision@10 (labels) | val/rankme (effective rank) | last;
    # auto: val/map@r for a supervised loss, last for a label-free one (labels, where any, are then only reported)
    monitor: str = "auto"
    patience: int = 5  # early stopping, in epochs without improvement
    resume: bool = True  # continue from checkpoints/<name>/last.ckpt when it exists
    checkpoint_dir: str = "checkpoints"
    name: str = "${data.name}-${finetune.loss}-unfreeze${finetune.unfreeze}"
    collapse_cosine: float = 0.95  # warn when the mean pairwise cosine of a batch exceeds this


@dataclass
class CompareConfig:
    checkpoint: str | None = None  # a fine-tuned checkpoint; None (and no checkpoints): fine-tune first with `finetune.*`
    checkpoints: list[str] = field(default_factory=list)  # more fine-tuned checkpoints from the same backbone: a row each
    unfreeze: list[int] = field(default_factory=list)  # no checkpoint given: train one model per value ([0, 3]: head and end to end)
    # no checkpoint given: train one model per loss (and unfreeze value): [byol, supcon] puts label-free beside supervised
    losses: list[str] = field(default_factory=list)
    chart: str = "comparison.png"


@dataclass
class ServeConfig:
    host: str = "127.0.0.1"  # loopback only: a shared machine's other users cannot reach it unless you say so
    port: int = 8000
    max_upload_mb: float = 10.0  # larger uploads get 413 before they are decoded
    max_k: int = 100  # the most neighbours one request may ask for
    batch_size: int = 16  # concurrent uploads embedded together in one forward pass
    batch_wait_ms: float = 5.0  # how long the first upload of a batch waits for others
    thumbnail_px: int = 256  # longest side of the images served at /items/{id}/image
    device: str = "auto"  # where uploads are embedded: auto | cpu | cuda
    # Host headers answered besides serve.host, localhost, 127.0.0.1 and [::1] (others get 400: DNS rebinding)
    allowed_hosts: list[str] = field(default_factory=list)
    upload_timeout_s: float = 30.0  # an upload body not received whole within this is answered 408 and closed
    header_timeout_s: float = 10.0  # a request's headers not received whole within this: the connection is closed


@dataclass
class ExportConfig:
    # clip-retrieval: img_emb/img_emb_0.npy + metadata/metadata_0.parquet (autofaiss, clip-retrieval read it) |
    # parquet: one embeddings.parquet, metadata columns and the vector as a fixed-size list column
    format: str = "clip-retrieval"
    dir: str = "${run.dir}/export-${export.format}"  # replaced whole once the new export is complete


@dataclass
class WandbConfig:
    enabled: bool = True
    mode: str = "offline"  # offline: no account needed, `wandb sync` uploads later | online | disabled
    project: str = "simsearch"
    entity: str | None = None
    group: str | None = None  # runs of one group sit side by side in a W&B report
    name: str | None = None  # default: <command>-<run dir name>
    dir: str | None = None  # W&B writes its `wandb/` folder here; None: in run.dir (never the current folder)
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggerConfig:
    wandb: WandbConfig = field(default_factory=WandbConfig)


@dataclass
class Config:
    run: RunConfig = field(default_factory=RunConfig)
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    store: StoreConfig = field(default_factory=StoreConfig)
    index: IndexConfig = field(default_factory=IndexConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    duplicates: DuplicatesConfig = field(default_factory=DuplicatesConfig)
    map: MapConfig = field(default_factory=MapConfig)
    finetune: FinetuneConfig = field(default_factory=FinetuneConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    serve: ServeConfig = field(default_factory=ServeConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
