"""A Milvus back end (`index.backend=milvus`): the store published into a Milvus collection, kept in step
with it, and searched there, filters included.

`index.uri` is a local file (Milvus Lite, the engine in-process: nothing to run) or `http(s)://host:port`
(a Milvus standalone or cluster: the same code). Credentials come from the environment only
(MILVUS_TOKEN, or MILVUS_USER and MILVUS_PASSWORD) and are never logged.

The collection holds one entity per item: `id` (the item's id, primary key), `vector`, `label`, every
metadata column, and `digest` (a hash of the item's key, label and metadata: what says an entity is out
of date). Publishing compares digests, so after an incremental extraction only new or changed items are
upserted and removed ones deleted. The collection's properties record the store it belongs to (its
directory and fingerprint) and the manifest it was last brought in step with: another store's or
model's collection is refused, a stale one is brought in step before it is searched.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import numpy as np
from omegaconf import DictConfig

from simsearch.errors import SimsearchError
from simsearch.filters import to_milvus
from simsearch.selection import Selection
from simsearch.store import Store

log = logging.getLogger(__name__)
UPSERT_BATCH = 2_000  # entities per upsert call (a message of a few MB at d=256)
QUERY_BATCH = 256  # query vectors per search call
# entities read back per page when comparing digests: pymilvus's largest, since Milvus Lite scans (and sorts) the
# whole collection for every page (docs/BENCHMARKS.md: a republish of 10^6 at 5,000 a page ran over 10 minutes)
DIGEST_PAGE = 16_384
VARCHAR_MAX = 65_535  # Milvus's longest VARCHAR, in bytes: any item id or string value fits
PROPERTY_STORE, PROPERTY_FINGERPRINT, PROPERTY_MANIFEST = "simsearch.store", "simsearch.fingerprint", "simsearch.manifest"


def import_pymilvus() -> Any:
    try:
        import pymilvus
    except ImportError as error:
        raise SimsearchError(f"index.backend=milvus needs pymilvus ({error}): `pip install -e .[milvus]` "
                             "(pymilvus and milvus-lite)") from None
    return pymilvus


@contextmanager
def milvus_errors(doing: str, uri: str) -> Iterator[None]:
    """pymilvus's exceptions (a server gone, a collection dropped meanwhile) as one sentence."""
    pymilvus = import_pymilvus()
    try:
        yield
    except pymilvus.exceptions.MilvusException as error:
        raise SimsearchError(f"Milvus at {shown_uri(uri)} failed while {doing}: {getattr(error, 'message', error)}") from None


def resolve_uri(store: Store, index_cfg: DictConfig) -> str:
    """index.uri: a server address as given, a local file resolved (default: milvus.db in the store's folder)."""
    uri = index_cfg.get("uri") or str(store.dir / "milvus.db")
    if re.match(r"^(https?|tcp|grpc)://", uri):
        return uri
    path = Path(uri).expanduser().resolve()
    if path.suffix != ".db":
        raise SimsearchError(f"index.uri={uri}: a Milvus Lite database is a file ending in .db, or give a server "
                             "address http://host:19530")
    return str(path)


def shown_uri(uri: str) -> str:
    """The address without any user:password in it, for logs and messages."""
    parts = urlsplit(uri)
    if parts.password or parts.username:
        return urlunsplit(parts._replace(netloc=parts.hostname + (f":{parts.port}" if parts.port else "")))
    return uri


def connect(uri: str) -> Any:
    """A MilvusClient for the uri; a server's credentials from MILVUS_TOKEN or MILVUS_USER + MILVUS_PASSWORD."""
    pymilvus = import_pymilvus()
    options: dict[str, Any] = {}
    if "://" in uri:
        if os.environ.get("MILVUS_TOKEN"):
            options["token"] = os.environ["MILVUS_TOKEN"]
        elif os.environ.get("MILVUS_USER"):
            options.update(user=os.environ["MILVUS_USER"], password=os.environ.get("MILVUS_PASSWORD", ""))
    try:
        return pymilvus.MilvusClient(uri, **options)
    except Exception as error:  # noqa: BLE001 - pymilvus raises its own kinds (MilvusException, grpc errors)
        first = str(error).splitlines()[0] if str(error) else type(error).__name__
        hint = "" if "://" in uri else " (a Milvus Lite file is opened by one process at a time: is a `simsearch serve` using it?)"
        raise SimsearchError(f"cannot connect to Milvus at index.uri={shown_uri(uri)}: {first}{hint}") from None


def collection_name(store: Store, index_cfg: DictConfig) -> str:
    """index.collection, or a name made of the store folder's name and a hash of its full path."""
    name = index_cfg.get("collection")
    if name:
        if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]{0,254}", name):
            raise SimsearchError(f"index.collection={name!r}: a Milvus collection name is letters, digits and _, "
                                 "not starting with a digit")
        return name
    folder = str(store.dir.resolve())
    stem = re.sub(r"[^A-Za-z0-9_]", "_", store.dir.resolve().name)[:64]
    return f"simsearch_{stem}_{hashlib.sha256(folder.encode()).hexdigest()[:10]}"


def store_owner(store: Store) -> dict[str, str]:
    """What a collection records of its store: the folder and the fingerprint (model and data source)."""
    fingerprint = store.manifest.get("fingerprint") or {"dim": store.dim}
    return {PROPERTY_STORE: str(store.dir.resolve()), PROPERTY_FINGERPRINT: json.dumps(fingerprint, sort_keys=True)}


def columns_of(store: Store) -> dict[str, str]:
    """The scalar fields: label and the metadata columns, with their kinds."""
    label = "str" if store.classes else "int"
    return {"label": label, **store.metadata_columns}


def digests(store: Store) -> list[str]:
    """One hash per row of what the entity holds besides its id: the item's key (its vector's identity within
    this fingerprint), label and metadata values."""
    metadata = store.metadata if store.metadata_columns else [None] * len(store)
    out = []
    for row, item in enumerate(store.items):
        content = json.dumps([item.get("key"), store.label_name(row), metadata[row]], sort_keys=True, default=str)
        out.append(hashlib.sha256(content.encode()).hexdigest()[:32])
    return out


class MilvusIndex:
    """The store's collection in Milvus: published and kept in step (`publish`), searched (`search`)."""

    def __init__(self, store: Store, index_cfg: DictConfig):
        self.store = store
        self.uri = resolve_uri(store, index_cfg)
        self.name = collection_name(store, index_cfg)
        self.factory = str(index_cfg.factory)
        self.search_settings = str(index_cfg.search_params or "")
        search_params(self.factory, 1, self.search_settings)  # a setting that does not fit: said before connecting
        self.batch_size = int(index_cfg.batch_size)
        self.client = connect(self.uri)
        self.kinds = columns_of(store)
        self._row_of_id: dict[str, int] = {}
        self.description = f"Milvus {self.factory} at {shown_uri(self.uri)} (collection {self.name})"

    # ---------------------------------------------------------------- publishing
    def _check_owner(self) -> bool:
        """True when the collection exists and belongs to this store (else one sentence refuses it)."""
        if not self.client.has_collection(self.name):
            return False
        properties = self.client.describe_collection(self.name).get("properties", {})
        owner = store_owner(self.store)
        if properties.get(PROPERTY_STORE) != owner[PROPERTY_STORE]:
            raise SimsearchError(f"the Milvus collection {self.name} at {shown_uri(self.uri)} belongs to another store "
                                 f"({properties.get(PROPERTY_STORE) or 'not made by simsearch'}): choose another "
                                 "index.collection, or drop that one")
        if properties.get(PROPERTY_FINGERPRINT) != owner[PROPERTY_FINGERPRINT]:
            raise SimsearchError(f"the Milvus collection {self.name} holds vectors of another model or data source than "
                                 f"the store {self.store.dir} (re-extracted with another model?): drop it, or choose "
                                 "another index.collection")
        return True

    def _fields_match(self) -> bool:
        fields = {f["name"]: f for f in self.client.describe_collection(self.name)["fields"]}
        wanted = {"id", "vector", "digest", *self.kinds}
        dim = int(fields.get("vector", {}).get("params", {}).get("dim", -1))
        return set(fields) == wanted and dim == self.store.dim

    def _create(self) -> None:
        pymilvus = import_pymilvus()
        types = {"str": pymilvus.DataType.VARCHAR, "int": pymilvus.DataType.INT64, "float": pymilvus.DataType.DOUBLE,
                 "bool": pymilvus.DataType.BOOL}
        schema = self.client.create_schema(auto_id=False, enable_dynamic_field=False)
        schema.add_field("id", pymilvus.DataType.VARCHAR, is_primary=True, max_length=VARCHAR_MAX)
        schema.add_field("vector", pymilvus.DataType.FLOAT_VECTOR, dim=self.store.dim)
        schema.add_field("digest", pymilvus.DataType.VARCHAR, max_length=64)
        for name, kind in self.kinds.items():
            extra = {"max_length": VARCHAR_MAX} if kind == "str" else {}
            schema.add_field(name, types[kind], nullable=True, **extra)
        params = self.client.prepare_index_params()
        params.add_index("vector", **index_params(self.factory))
        self.client.create_collection(self.name, schema=schema, index_params=params,
                                      properties=store_owner(self.store), consistency_level="Strong")

    def _published_digests(self) -> dict[str, str]:
        iterator = self.client.query_iterator(self.name, batch_size=DIGEST_PAGE, filter="", output_fields=["id", "digest"])
        found: dict[str, str] = {}
        try:
            while batch := iterator.next():
                found.update((entity["id"], entity["digest"]) for entity in batch)
        finally:
            iterator.close()
        return found

    def publish(self) -> dict[str, Any]:
        """Bring the collection in step with the store: create it if missing, upsert new and changed items, delete
        removed ones. Returns the counts (upserted, deleted, unchanged) and the time taken."""
        with milvus_errors(f"publishing {self.store.dir} into {self.name}", self.uri):
            return self._publish()

    def _publish(self) -> dict[str, Any]:
        started = time.perf_counter()
        exists = self._check_owner()
        if exists and not self._fields_match():
            log.warning("the Milvus collection %s has other fields than the store now has (a new catalogue?): "
                        "publishing it again whole", self.name)
            self.client.drop_collection(self.name)
            exists = False
        if not exists:
            self._create()
        else:  # released when Milvus (Lite) started again: loaded to be read
            self.client.load_collection(self.name)
        published = self._published_digests() if exists else {}
        wanted = digests(self.store)
        ids = [str(item["id"]) for item in self.store.items]
        changed = [row for row, (item_id, digest) in enumerate(zip(ids, wanted)) if published.get(item_id) != digest]
        removed = sorted(set(published) - set(ids))
        for start in range(0, len(changed), UPSERT_BATCH):
            self.client.upsert(self.name, self._entities(changed[start:start + UPSERT_BATCH], ids, wanted))
        for start in range(0, len(removed), UPSERT_BATCH):
            self.client.delete(self.name, ids=removed[start:start + UPSERT_BATCH])
        if changed or removed:  # sealed and indexed: unflushed rows are searched raw (0.7 s a query at 2*10^4, measured)
            self.client.flush(self.name)
        self.client.alter_collection_properties(self.name, {PROPERTY_MANIFEST: self.store.manifest.get("manifest_sha256", "")})
        self.client.load_collection(self.name)
        report = {"backend": "milvus", "uri": shown_uri(self.uri), "collection": self.name, "factory": self.factory,
                  "count": len(ids), "upserted": len(changed), "deleted": len(removed),
                  "unchanged": len(ids) - len(changed), "seconds": round(time.perf_counter() - started, 3)}
        log.info("Milvus collection %s in step with %s: %d upserted, %d deleted, %d unchanged", self.name,
                 self.store.dir, report["upserted"], report["deleted"], report["unchanged"])
        return report

    def _entities(self, rows: list[int], ids: list[str], wanted: list[str]) -> list[dict[str, Any]]:
        vectors = self.store.vectors(np.array(rows, dtype=np.int64))
        metadata = self.store.metadata if self.store.metadata_columns else None
        entities = []
        for position, row in enumerate(rows):
            entity = {"id": ids[row], "vector": vectors[position].tolist(), "digest": wanted[row]}
            entity["label"] = self.store.label_name(row) if self.kinds["label"] == "str" else \
                (int(self.store.labels[row]) if self.store.labels[row] >= 0 else None)
            if metadata is not None:
                entity.update(metadata[row])
            entities.append(entity)
        return entities

    def in_step(self) -> bool:
        """The collection exists, is the store's, and was last brought in step with this very manifest."""
        if not self._check_owner() or not self._fields_match():
            return False
        properties = self.client.describe_collection(self.name).get("properties", {})
        return properties.get(PROPERTY_MANIFEST) == self.store.manifest.get("manifest_sha256")

    # ---------------------------------------------------------------- searching
    def search(self, queries: np.ndarray, k: int, expression: str = "") -> tuple[np.ndarray, np.ndarray]:
        """(Q, D) -> scores and rows (Q, k), best first, equal scores by row; -1 where fewer were found."""
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        scores = np.full((len(queries), k), -np.inf, dtype=np.float32)
        rows = np.full((len(queries), k), -1, dtype=np.int64)
        if k == 0:
            return scores, rows
        step = min(QUERY_BATCH, self.batch_size)
        params = {"metric_type": "IP", **search_params(self.factory, k, self.search_settings)}
        for start in range(0, len(queries), step):
            with milvus_errors(f"searching {self.name}", self.uri):
                answers = self.client.search(self.name, data=queries[start:start + step].tolist(), limit=k,
                                             filter=expression, output_fields=["id"], anns_field="vector",
                                             search_params=params)
            for offset, hits in enumerate(answers):
                found = sorted(((float(hit["distance"]), self.row_of(hit["id"])) for hit in hits),
                               key=lambda pair: (-pair[0], pair[1]))[:k]
                for position, (score, row) in enumerate(found):
                    scores[start + offset, position], rows[start + offset, position] = score, row
        return scores, rows

    def row_of(self, item_id: str) -> int:
        """The store row of an entity, by id only (never a row number): an id the store lacks is refused."""
        if not self._row_of_id:
            self._row_of_id = {str(item["id"]): row for row, item in enumerate(self.store.items)}
        if item_id not in self._row_of_id:
            raise SimsearchError(f"the Milvus collection {self.name} holds the item {item_id!r}, which the store "
                                 f"{self.store.dir} has not: run `simsearch index index.backend=milvus` to bring it in step")
        return self._row_of_id[item_id]

    def search_filtered(self, queries: np.ndarray, k: int, selection: Selection, own_row: int | None = None
                        ) -> tuple[np.ndarray, np.ndarray]:
        """The top-k among the items the filter keeps, filtered inside Milvus: the parsed filter is written as
        a Milvus expression (`filters.to_milvus`), never the text as typed; `own_row` is left out."""
        expression = to_milvus(selection.tree, selection.kinds)
        depth = k + (own_row is not None)
        scores, rows = self.search(queries, depth, expression)
        if own_row is None:
            return scores, rows
        keep = rows != own_row
        keep[keep.all(axis=1), -1] = False  # own row not among them: drop the last
        return scores[keep].reshape(len(queries), k), rows[keep].reshape(len(queries), k)


def index_params(factory: str) -> dict[str, Any]:
    """index.factory in Milvus's terms: Flat -> FLAT (exact), HNSW<M> -> HNSW, IVF<n>,Flat -> IVF_FLAT."""
    spec = factory.replace(" ", "")
    if spec.lower() in ("flat", "idmap,flat"):
        return {"index_type": "FLAT", "metric_type": "IP"}
    if match := re.fullmatch(r"HNSW(\d+)(,Flat)?", spec):
        return {"index_type": "HNSW", "metric_type": "IP", "params": {"M": int(match.group(1)), "efConstruction": 200}}
    if match := re.fullmatch(r"IVF(\d+),Flat", spec):
        return {"index_type": "IVF_FLAT", "metric_type": "IP", "params": {"nlist": int(match.group(1))}}
    raise SimsearchError(f"index.factory={factory} has no Milvus counterpart here: use Flat (exact), HNSW32 or IVF1024,Flat")


# index.search_params (FAISS's ParameterSpace names) -> Milvus's search parameter, per index type
MILVUS_SEARCH_PARAMS = {"HNSW": {"efSearch": "ef"}, "IVF_FLAT": {"nprobe": "nprobe"}}
DEFAULT_SEARCH_PARAMS = {"HNSW": {"ef": 64}, "IVF_FLAT": {"nprobe": 16}}


def search_params(factory: str, k: int, given: str = "") -> dict[str, Any]:
    """Milvus's search parameters from index.search_params, written as for FAISS ("nprobe=32", "efSearch=128"),
    so one setting means the same on both back ends; HNSW's ef is never below k (Milvus refuses that)."""
    kind = index_params(factory)["index_type"]
    params = dict(DEFAULT_SEARCH_PARAMS.get(kind, {}))
    names = MILVUS_SEARCH_PARAMS.get(kind, {})
    for setting in filter(None, given.replace(" ", "").split(",")):
        name, _, value = setting.partition("=")
        if name not in names or not value.isdigit() or int(value) < 1:
            usable = ", ".join(f"{n}=N" for n in names) or "nothing (an exact index has no search parameters)"
            raise SimsearchError(f"index.search_params='{given}': {setting!r} does not fit the Milvus index "
                                 f"{factory}; it takes {usable}")
        params[names[name]] = int(value)
    if kind == "HNSW":
        params["ef"] = max(params["ef"], k)
    return {"params": params} if params else {}


def open_milvus(store: Store, index_cfg: DictConfig) -> MilvusIndex:
    """The store's Milvus collection, brought in step first when the store changed since it was published."""
    index = MilvusIndex(store, index_cfg)
    with milvus_errors(f"opening {index.name}", index.uri):
        if not index.in_step():
            index.publish()
        else:  # loaded into memory for search: a collection of a Milvus (Lite) started since is released
            index.client.load_collection(index.name)
    return index
