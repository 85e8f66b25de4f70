"""Shared fixtures: the real default model, tiny models built on the spot, a small calibration
corpus, and the real servers the end-to-end modules share (:class:`Servers`)."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# A `ray start --block` node told to stop (SIGTERM: the cluster tests' nodes) marks itself
# draining and waits up to 30 s for its work to move elsewhere before it stops, which no test
# here waits for: a node the tests stop goes at once, as one that is lost does.
os.environ.setdefault("RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S", "0")

from serve_app.config.schema import ModelConfig
from serve_app.engine.embedding import EmbeddingEngine
from serve_app.engine.model_files import resolve_model_dir
from serve_app.engine.quantize import calibration_texts
from serve_app.testing import server as testing_server
from serve_app.testing.server import Server, free_port, serve_config, start_server
from tests.helpers import MAX_LOADED, ROBUST_LIMITS, ROBUST_QUEUE, VARIANT_CORPUS, VARIANTS

_TOKENIZER_FILES = ("vocab.txt", "tokenizer.json", "tokenizer_config.json",
                    "special_tokens_map.json")
_POOLING_FLAG = {
    "mean": "pooling_mode_mean_tokens",
    "cls": "pooling_mode_cls_token",
    "max": "pooling_mode_max_tokens",
    "lasttoken": "pooling_mode_lasttoken",
    "mean_sqrt_len": "pooling_mode_mean_sqrt_len_tokens",
}


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--soak-seconds", type=int, default=0,
                     help="run the soak test (tests/test_robustness.py) for this many seconds")


def pytest_configure(config: pytest.Config) -> None:
    """Each xdist worker's servers get direct-ingress ranges of their own (the environment they
    inherit; at most 5 workers). The launcher picks a free window itself
    (serve_app.env.instance_env), but two servers starting in the same second could pick the
    same one, and replicas' gRPC servers share a taken port: one server's HAProxy connections
    would reach the other's replicas."""
    if not hasattr(config, "workerinput") and config.getoption("numprocesses", None):
        return  # xdist's controller: its workers, which inherit its environment, set theirs
    worker = int(os.environ.get("PYTEST_XDIST_WORKER", "gw0").removeprefix("gw") or 0)
    for proto, base in (("HTTP", 30000), ("GRPC", 40000)):
        low = base + 250 * worker
        os.environ.setdefault(f"RAY_SERVE_DIRECT_INGRESS_MIN_{proto}_PORT", str(low))
        os.environ.setdefault(f"RAY_SERVE_DIRECT_INGRESS_MAX_{proto}_PORT", str(low + 249))
    # and so do the ports tests hand to servers (serve_app.testing.server.free_port)
    os.environ.setdefault(testing_server.PORTS_ENV,
                          f"{20000 + 2000 * worker}-{20000 + 2000 * worker + 1999}")


# -- real servers, shared ----------------------------------------------------------------------

#: The fixtures that hold a shared server (each defined below with @shared_server).
SERVER_FIXTURES: set[str] = set()


class Servers:
    """Real servers (:func:`serve_app.testing.server.start_server`: ``python -m serve_app
    --config``) shared by every test that asks for the same config, each started on first use
    on free loopback ports and stopped by its pid once the last test that uses it has run (or
    when the session ends). Modules that share one run one after another
    in one worker (:func:`pytest_collection_modifyitems`), so at most one shared server runs
    at a time in each and none idles on the cores while other tests run."""

    def __init__(self, tmp: pytest.TempPathFactory) -> None:
        self._tmp = tmp
        self._running: dict[str, tuple[Server, contextlib.ExitStack]] = {}
        self._holders: dict[str, str] = {}  # fixture name -> config key

    def get(self, holder: str, args: dict, *, grpc: bool = True,
            more_apps: tuple[dict, ...] = (), extra_env: dict[str, str] | None = None) -> Server:
        """The server of serve_app ``args`` (and ``more_apps``), with gRPC when ``grpc``,
        started now unless one runs already; ``holder``: the fixture asking."""
        key = json.dumps([args, more_apps, grpc, extra_env], sort_keys=True)
        self._holders[holder] = key
        if key in self._running and self._running[key][0].proc.poll() is not None:
            self._running.pop(key)[1].close()  # a test killed it (tests/test_entry.py)
        if key not in self._running:
            config = serve_config(free_port(), args, free_port() if grpc else None, more_apps)
            stack = contextlib.ExitStack()
            server = stack.enter_context(start_server(config, self._tmp.mktemp(holder),
                                                      extra_env=extra_env))
            self._running[key] = (server, stack)
        return self._running[key][0]

    def release(self, holder: str) -> None:
        """``holder`` needs its server no more: stop it unless another holder still does."""
        key = self._holders.pop(holder, None)
        if key is not None and key not in self._holders.values() and key in self._running:
            self._running.pop(key)[1].close()

    def close(self) -> None:
        for holder in list(self._holders):
            self.release(holder)


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory, request: pytest.FixtureRequest
            ) -> Iterator[Servers]:
    pool = Servers(tmp_path_factory)
    request.config.stash[_POOL] = pool
    try:
        yield pool
    finally:
        pool.close()


_POOL = pytest.StashKey[Servers]()
_LAST_USER = pytest.StashKey[dict[str, list[str]]]()


def shared_server(fn: Callable[..., Server]) -> Callable[..., Server]:
    """A fixture holding a shared server: ``fn`` asks :class:`Servers` for it (module-scoped:
    each module asks again and gets the one running; its name tells the pool who holds it)."""
    SERVER_FIXTURES.add(fn.__name__)
    return pytest.fixture(scope="module")(fn)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Modules stay whole and in order, except that a module sharing a server with an earlier
    one runs right after it (the server then runs once, and only while its users run).

    Under ``make test`` (xdist, ``--dist loadgroup``) each such run of modules is one group,
    given whole to one worker: a shared server starts once, in the worker whose tests use it.
    The groups that start servers come first (they wait on Ray and sockets, the cores are
    shared with the rest), the tests that start none fill in after them."""
    modules: dict[str, list[pytest.Item]] = {}
    for item in items:
        modules.setdefault(item.nodeid.split("::")[0], []).append(item)
    uses = {m: {f for i in its for f in i.fixturenames if f in SERVER_FIXTURES}
            for m, its in modules.items()}
    group: dict[str, str] = {}
    order: list[str] = []
    for m in modules:
        if m in order:
            continue
        # the modules that share a server with m, directly or through another
        members, fixtures = [m], set(uses[m])
        grown = True
        while grown:
            grown = False
            for o in modules:
                if o not in members and o not in order and uses[o] & fixtures:
                    members.append(o)
                    fixtures |= uses[o]
                    grown = True
        order += members
        group.update((o, m) for o in members)
    starting = {group[m] for m in modules
                if any(i.get_closest_marker("e2e") for i in modules[m])}
    order.sort(key=lambda m: group[m] not in starting)
    items[:] = [i for m in order for i in modules[m]]
    if config.getoption("loadgroup", False):  # an xdist worker under --dist loadgroup
        for m in order:
            for item in modules[m]:
                _join_group(item, group[m].replace("/", "."))


def _join_group(item: pytest.Item, name: str) -> None:
    """Put ``item`` in xdist group ``name``: its node id gets the ``@name`` suffix xdist's
    scheduler reads. (xdist sets it from ``xdist_group`` marks by assigning ``_nodeid``, which
    pytest 9 no longer reads: its node ids live in ``_id``.)"""
    if hasattr(item, "_id"):
        from _pytest.nodeid import coerce_node_id

        item._id = coerce_node_id(f"{item.nodeid}@{name}")
    else:
        item.add_marker(pytest.mark.xdist_group(name))


def pytest_collection_finish(session: pytest.Session) -> None:
    last: dict[str, str] = {}
    for item in session.items:
        for f in item.fixturenames:
            if f in SERVER_FIXTURES:
                last[f] = item.nodeid
    released: dict[str, list[str]] = {}
    for f, nodeid in last.items():
        released.setdefault(nodeid, []).append(f)
    session.config.stash[_LAST_USER] = released


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None):
    yield
    pool = item.config.stash.get(_POOL, None)
    if pool is not None:
        for holder in item.config.stash.get(_LAST_USER, {}).get(item.nodeid, []):
            pool.release(holder)


_STARTED_BEFORE = pytest.StashKey[int]()


@pytest.hookimpl(tryfirst=True)
def pytest_runtest_setup(item: pytest.Item) -> None:
    item.stash[_STARTED_BEFORE] = len(testing_server.STARTED)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item):
    """A test that starts a server (through serve_app.testing.server, in its fixtures or
    itself) fails unless it is marked e2e: ``make test-fast`` (-m "not e2e") starts none."""
    result = yield
    started = len(testing_server.STARTED) - item.stash.get(_STARTED_BEFORE, 0)
    if started and item.get_closest_marker("e2e") is None:
        pytest.fail(f"{item.nodeid} started {started} server(s) but is not marked e2e")
    return result


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    if testing_server.STARTED:
        terminalreporter.write_line(
            f"servers started (python -m serve_app, serve run): {len(testing_server.STARTED)}")


@pytest.fixture(scope="session")
def small_corpus(tmp_path_factory: pytest.TempPathFactory) -> str:
    """A calibration corpus of 32 lines (the shipped one's first), for servers whose int8
    ranges no test looks at: each replica embeds it at warm-up instead of 600 texts."""
    path = tmp_path_factory.mktemp("corpus") / "calibration.txt"
    path.write_text("\n".join(calibration_texts()[:32]) + "\n")
    return str(path)


@pytest.fixture(scope="session")
def minilm_dir() -> Path:
    return resolve_model_dir("sentence-transformers/all-MiniLM-L6-v2")


@pytest.fixture(scope="session")
def engine() -> EmbeddingEngine:
    return EmbeddingEngine(ModelConfig(), num_threads=2)


TinyFactory = Callable[..., Path]


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> TinyFactory:
    """Build a small random BERT (MiniLM's tokenizer) as a sentence-transformers directory.

    ``pooling=None`` writes no sentence-transformers files at all (a plain HF model).
    ``include_prompt`` writes the pooling config as sentence-transformers 6 does, with it.
    """
    import torch
    from transformers import BertConfig, BertModel

    made: dict[tuple, Path] = {}

    def build(
        pooling: str | None = "mean",
        normalize: bool = True,
        max_seq_length: int | None = 64,
        prompt: str | None = None,
        max_position_embeddings: int = 128,
        include_prompt: bool | None = None,
    ) -> Path:
        key = (pooling, normalize, max_seq_length, prompt, max_position_embeddings,
               include_prompt)
        if key in made:
            return made[key]
        d = tmp_path_factory.mktemp(f"tiny-{pooling}")
        torch.manual_seed(0)
        cfg = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=max_position_embeddings,
        )
        BertModel(cfg).eval().save_pretrained(d)
        for f in _TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, d / f)
        if pooling is not None:
            st = "sentence_transformers.models."
            modules = [
                {"idx": 0, "name": "0", "path": "", "type": st + "Transformer"},
                {"idx": 1, "name": "1", "path": "1_Pooling", "type": st + "Pooling"},
            ]
            if normalize:
                modules.append({"idx": 2, "name": "2", "path": "2_Normalize",
                                "type": st + "Normalize"})
                (d / "2_Normalize").mkdir()
            (d / "modules.json").write_text(json.dumps(modules))
            (d / "1_Pooling").mkdir()
            pcfg = {"word_embedding_dimension": 32, **{v: False for v in _POOLING_FLAG.values()}}
            pcfg[_POOLING_FLAG[pooling]] = True
            if include_prompt is not None:  # as sentence-transformers 6 writes it
                mode = "mean_sqrt_len_tokens" if pooling == "mean_sqrt_len" else pooling
                pcfg = {"embedding_dimension": 32, "pooling_mode": mode,
                        "include_prompt": include_prompt}
            (d / "1_Pooling" / "config.json").write_text(json.dumps(pcfg))
            if max_seq_length is not None:
                (d / "sentence_bert_config.json").write_text(
                    json.dumps({"max_seq_length": max_seq_length, "do_lower_case": False})
                )
            if prompt is not None:
                (d / "config_sentence_transformers.json").write_text(
                    json.dumps({"prompts": {"query": prompt}, "default_prompt_name": "query"})
                )
        made[key] = d
        return d

    return build


@pytest.fixture(scope="session")
def cross_encoder(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> TinyFactory:
    """Build a small random one-label cross-encoder (BERT, MiniLM's tokenizer).

    ``saved_by``: "transformers" writes a plain sequence-classification directory (the default
    sigmoid applies); "sentence-transformers" saves it through ``CrossEncoder`` with
    ``activation`` (a torch.nn class name) in its config. ``labels``: other label counts make
    models serve_app must refuse."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    made: dict[tuple, Path] = {}

    def build(saved_by: str = "transformers", activation: str = "Identity",
              max_position_embeddings: int = 128, labels: int = 1) -> Path:
        key = (saved_by, activation, max_position_embeddings, labels)
        if key in made:
            return made[key]
        d = tmp_path_factory.mktemp("cross-encoder")
        torch.manual_seed(1)
        cfg = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=max_position_embeddings,
            num_labels=labels, initializer_range=0.5,  # wide weights: scores that differ
        )
        BertForSequenceClassification(cfg).eval().save_pretrained(d)
        for f in _TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, d / f)
        if saved_by == "sentence-transformers":
            from sentence_transformers import CrossEncoder

            act = getattr(torch.nn, activation)()
            out = tmp_path_factory.mktemp("cross-encoder-st")
            CrossEncoder(str(d), activation_fn=act).save_pretrained(str(out))
            d = out
        made[key] = d
        return d

    return build


#: the tiny classifier's labels
CLASSIFIER_LABELS = ("negative", "neutral", "positive")


@pytest.fixture(scope="session")
def classifier(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> TinyFactory:
    """Build a small random sequence classifier (BERT, MiniLM's tokenizer) with named labels
    (:data:`CLASSIFIER_LABELS`). ``problem_type``: transformers' (multi-label models get
    sigmoid scores); ``labels``: how many (named ``LABEL_i`` when not three)."""
    import torch
    from transformers import BertConfig, BertForSequenceClassification

    made: dict[tuple, Path] = {}

    def build(problem_type: str | None = None, labels: int = 3) -> Path:
        key = (problem_type, labels)
        if key in made:
            return made[key]
        d = tmp_path_factory.mktemp("classifier")
        torch.manual_seed(3)
        names = dict(enumerate(CLASSIFIER_LABELS)) if labels == 3 else None
        cfg = BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128, num_labels=labels,
            initializer_range=0.5, problem_type=problem_type,
            **({"id2label": names, "label2id": {v: k for k, v in names.items()}}
               if names else {}))
        BertForSequenceClassification(cfg).eval().save_pretrained(d)
        for f in _TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, d / f)
        made[key] = d
        return d

    return build


@pytest.fixture(scope="session")
def splade(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> TinyFactory:
    """Build a small random SPLADE model as sentence-transformers' ``SparseEncoder`` saves it
    (a BERT masked-language model, MiniLM's tokenizer, ``SpladePooling``). Its output bias is
    lowered so that, as in a trained SPLADE model, most of the vocabulary scores 0.
    ``pooling``/``activation``: SpladePooling's; ``plain``: the masked-language model's own
    directory, no sentence-transformers files."""
    import torch
    from transformers import BertConfig, BertForMaskedLM

    made: dict[tuple, Path] = {}

    def build(pooling: str = "max", activation: str = "relu", plain: bool = False) -> Path:
        key = (pooling, activation, plain)
        if key in made:
            return made[key]
        d = tmp_path_factory.mktemp("mlm")
        torch.manual_seed(4)
        model = BertForMaskedLM(BertConfig(
            vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=128))
        with torch.no_grad():  # about 2% of the vocabulary above 0 per token
            model.cls.predictions.bias -= 0.28
        model.eval().save_pretrained(d)
        for f in _TOKENIZER_FILES:
            shutil.copy(minilm_dir / f, d / f)
        if not plain:
            from sentence_transformers import SparseEncoder
            from sentence_transformers.base.modules.transformer import Transformer
            from sentence_transformers.sparse_encoder.modules import SpladePooling

            out = tmp_path_factory.mktemp("splade")
            SparseEncoder(modules=[Transformer(str(d), transformer_task="fill-mask"),
                                   SpladePooling(pooling, activation)]).save(str(out))
            d = out
        made[key] = d
        return d

    return build


def _tiny_bert(folder: Path, minilm_dir: Path, seed: int, **config: Any) -> Path:
    """A small random BERT (hidden 64, 2 layers) with MiniLM's tokenizer, saved to ``folder``."""
    import torch
    from transformers import BertConfig, BertModel

    torch.manual_seed(seed)
    BertModel(BertConfig(vocab_size=30522, hidden_size=64, num_hidden_layers=2,
                         num_attention_heads=4, intermediate_size=128,
                         max_position_embeddings=128, **config)).eval().save_pretrained(folder)
    for f in _TOKENIZER_FILES:
        shutil.copy(minilm_dir / f, folder / f)
    return folder


#: the tiny ColBERT checkpoints tests/refs/pylate_encode.py builds, by name: PyLate's defaults
#: (at small lengths), attending to the expansion tokens, and neither expansion nor markers
COLBERT_VARIANTS = {
    "default": {"embedding_size": 24, "query_length": 16, "document_length": 48},
    "attend": {"embedding_size": 24, "query_length": 16, "document_length": 48,
               "attend_to_expansion_tokens": True},
    "plain": {"embedding_size": 24, "query_length": 16, "document_length": 48,
              "do_query_expansion": False, "query_prefix": "", "document_prefix": ""},
}
COLBERT_QUERIES = ["what is late interaction?", "ColBERT",
                   "How do multi-vector retrievers, such as ColBERT, PLAID and XTR, compare "
                   "with single-vector dense retrievers on long documents?",
                   "  leading and trailing spaces  "]
COLBERT_DOCUMENTS = [
    "Late interaction encodes queries and documents into token-level vectors.",
    "Hello, world! Punctuation: commas, periods. And (parentheses); quotes \"like this\"?",
    "A long document that goes well beyond the document length, so that truncation happens: "
    "it keeps talking about retrieval, indexing, compression, residuals, centroids, PLAID, "
    "MaxSim scoring and many other things that ColBERT-style models do when they encode "
    "passages.",
    "short", "Café naïve résumé — unicode, accents and a dash…", "..."]


@pytest.fixture(scope="session")
def colbert(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """Tiny PyLate ColBERT checkpoints, built by PyLate itself in its own environment
    (tests/references.py), and its vectors and scores for :data:`COLBERT_QUERIES` and
    :data:`COLBERT_DOCUMENTS`: ``<folder>/<variant>`` and ``<folder>/<variant>.npz``."""
    from tests.references import reference

    source = _tiny_bert(tmp_path_factory.mktemp("colbert-source"), minilm_dir, seed=7)
    return reference("pylate", "pylate_encode.py", {
        "queries": COLBERT_QUERIES, "documents": COLBERT_DOCUMENTS,
        "variants": COLBERT_VARIANTS}, {"source": source})


#: the texts tests compare with FlagEmbedding's BGE-M3 outputs, and the token limit used
M3_TEXTS = ["What is BGE M3?", "Dense, sparse and multi-vector retrieval from one model.",
            "the the the repeated repeated words", "an emoji 🦜 and accents: café",
            "a text long enough that a limit of thirty-two tokens cuts it somewhere in the "
            "middle of this sentence, well before its end, which comes only after many more "
            "words than the limit allows"]
M3_MAX_LENGTH = 32


@pytest.fixture(scope="session")
def bge_m3(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> tuple[Path, Path]:
    """A tiny BGE-M3 checkpoint (a BERT and FlagEmbedding's two heads beside it: its
    initializer range widened so that texts' [CLS] states differ) and FlagEmbedding's outputs
    for :data:`M3_TEXTS` (tests/refs/bgem3_encode.py, in its own environment): (folder, npz)."""
    import torch

    from tests.references import reference

    folder = _tiny_bert(tmp_path_factory.mktemp("bge-m3"), minilm_dir, seed=3,
                        initializer_range=0.2)
    torch.manual_seed(5)
    torch.save(torch.nn.Linear(64, 64).state_dict(), folder / "colbert_linear.pt")
    sparse = torch.nn.Linear(64, 1)
    with torch.no_grad():  # most tokens weigh more than 0, some exactly 0
        sparse.bias.fill_(0.8)
    torch.save(sparse.state_dict(), folder / "sparse_linear.pt")
    out = reference("flagembedding", "bgem3_encode.py",
                    {"texts": M3_TEXTS, "max_length": M3_MAX_LENGTH}, {"model": folder})
    return folder, out / "ref.npz"


@pytest.fixture(scope="session")
def prompted_minilm(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path) -> Path:
    """all-MiniLM-L6-v2 with the prompts of an asymmetric model (as E5 names them), no default:
    its files linked, its config_sentence_transformers.json rewritten."""
    d = tmp_path_factory.mktemp("minilm-prompts")
    for f in minilm_dir.iterdir():
        if f.name != "config_sentence_transformers.json":
            (d / f.name).symlink_to(f)
    (d / "config_sentence_transformers.json").write_text(json.dumps(
        {"prompts": {"query": "query: ", "document": "passage: ", "plain": ""},
         "default_prompt_name": None}))
    return d


# -- the shared servers: one fixture per config ------------------------------------------------

REPO = Path(__file__).resolve().parent.parent


def local_args() -> dict:
    """serve_app's args in configs/local.yaml (what ``make serve`` serves)."""
    import yaml

    config = yaml.safe_load((REPO / "configs" / "local.yaml").read_text())
    return config["applications"][0]["args"]


@shared_server
def e2e_server(servers: Servers, tiny_model: TinyFactory, small_corpus: str, colbert: Path,
               bge_m3: tuple[Path, Path]) -> Server:
    """Four models in one app (the default model; a tiny CLS-pooled one, whose long texts split
    into windows of 64 tokens that share 8; a tiny PyLate ColBERT model; a tiny BGE-M3) plus a
    second application, so gRPC clients that send no ``application`` metadata are put to the
    test."""
    other = {
        "name": "other",
        "route_prefix": "/other",
        "import_path": "serve_app.serve:build_app",
        "args": {"models": [{"name": "other-tiny", "model_id": str(tiny_model(pooling="max")),
                             "deployment": {"num_cpus": 0.5}}]},
    }
    return servers.get("e2e_server", {
        "server_name": "e2e",
        "models": [
            {"name": "embedding", "calibration_corpus": small_corpus,
             "batching": {"max_batch_size": 32, "batch_wait_timeout_s": 0.002},
             "deployment": {"num_cpus": 1}},
            {"name": "tiny", "model_id": str(tiny_model(pooling="cls")),
             "calibration_corpus": small_corpus, "deployment": {"num_cpus": 0.5},
             "chunk_overlap": 8, "max_document_tokens": 600},
            # no CPUs of their own: the two above and the other app's model take the 2; torch,
            # which starts without a conversion (tests/test_multivector.py holds the others)
            {"name": "colbert", "model_id": str(colbert / "default"), "task": "multivector",
             "backend": "torch", "calibration_corpus": small_corpus,
             "deployment": {"num_cpus": 0}},
            {"name": "m3", "model_id": str(bge_m3[0]), "max_length": M3_MAX_LENGTH,
             "backend": "torch", "calibration_corpus": small_corpus,
             "deployment": {"num_cpus": 0}},
        ],
    }, more_apps=(other,))


@shared_server
def separate_server(servers: Servers, prompted_minilm: Path, cross_encoder: TinyFactory,
                    classifier: TinyFactory, splade: TinyFactory, small_corpus: str) -> Server:
    """configs/local.yaml with ``topology: separate``, serving the default model's weights with
    the query/document prompts of an asymmetric model (no default prompt: a request naming none
    gets the default model's vectors), a tiny reranker, a tiny classifier and a tiny SPLADE
    model, each in a model deployment of its own: requests and results cross to the model
    replicas over Ray. The real calibration corpus for the first: test_e2e_retrieval compares
    int8 codes with sentence-transformers' on it."""
    args = local_args()
    (model,) = args.pop("models")
    return servers.get("separate_server", {**args, "topology": "separate", "models": [
        {**model, "model_id": str(prompted_minilm), "deployment": {"num_cpus": 1}},
        {"name": "reranker", "model_id": str(cross_encoder()), "task": "rerank",
         "deployment": {"num_cpus": 0.5}},
        {"name": "classifier", "model_id": str(classifier()), "task": "classify",
         "calibration_corpus": small_corpus, "deployment": {"num_cpus": 0.25}},
        {"name": "splade", "model_id": str(splade()), "task": "sparse",
         "calibration_corpus": small_corpus, "deployment": {"num_cpus": 0.25}},
    ]})


@shared_server
def robust_server(servers: Servers, small_corpus: str) -> Server:
    """The default entry point's shape (the model inside the ingress replica) with small
    limits, a small admission bound and a quick health check."""
    return servers.get("robust_server", {
        "models": [{
            "name": "embedding",
            "calibration_corpus": small_corpus,
            "max_queued_inputs": ROBUST_QUEUE,
            "deployment": {"num_cpus": 1, "max_ongoing_requests": ROBUST_QUEUE,
                           "health_check_period_s": 1, "health_check_timeout_s": 10},
        }],
        "limits": ROBUST_LIMITS,
        "ingress": {"request_timeout_s": 20},
    })


@pytest.fixture(scope="session")
def variant_checkpoints(tmp_path_factory: pytest.TempPathFactory, minilm_dir: Path
                        ) -> dict[str, Path]:
    """Six variants of the default model, a checkpoint that cannot load, and one that is not a
    variant of the base (other pooling)."""
    from serve_app.testing.variants import make_variants

    root = tmp_path_factory.mktemp("variants")
    made = make_variants(minilm_dir, root / "fine-tunes", VARIANTS)
    broken = root / "broken"
    broken.mkdir()
    (broken / "config.json").write_text((minilm_dir / "config.json").read_text())
    (broken / "model.safetensors").write_bytes(b"not weights")
    other = make_variants(minilm_dir, root / "other", ["cls-pooled"], pooling="cls")
    return {**made, **other, "broken": broken, "root": root}


@shared_server
def variants_server(servers: Servers, variant_checkpoints: dict[str, Path]) -> Server:
    """One model entry whose variants load on first use into two replicas holding two each."""
    corpus = variant_checkpoints["root"] / "corpus.txt"
    corpus.write_text("\n".join(VARIANT_CORPUS))
    return servers.get("variants_server", {"models": [{
        "name": "embedding", "calibration_corpus": str(corpus),
        "deployment": {"num_replicas": 2, "num_cpus": 0.5},
        "variants": {"directory": str(variant_checkpoints["root"] / "fine-tunes"),
                     "models": [{"name": "broken",
                                 "model_id": str(variant_checkpoints["broken"])},
                                str(variant_checkpoints["cls-pooled"])],
                     "max_loaded": MAX_LOADED}}]})


@pytest.fixture(scope="module")
def http(server: Server) -> Iterator:
    """An httpx client on the module's ``server``."""
    import httpx

    with httpx.Client(base_url=server, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def oai(server: Server):
    """The openai SDK on the module's ``server`` (no retries: every error is seen)."""
    import openai

    return openai.OpenAI(base_url=f"{server}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="session")
def bulk_corpus(tmp_path_factory: pytest.TempPathFactory, engine: EmbeddingEngine
                ) -> tuple[Path, list[str], object]:
    """3000 distinct texts of a few words as JSON lines, and their vectors from direct engine
    calls (the bulk client's runs in tests/test_robustness.py and tests/test_e2e_bulk.py)."""
    texts = [f"document {i}: {' '.join(['word'] * (i % 8))} about topic {i % 97}"
             for i in range(3000)]
    path = tmp_path_factory.mktemp("bulk") / "texts.jsonl"
    path.write_text("".join(json.dumps({"id": i, "text": t}) + "\n" for i, t in enumerate(texts)))
    return path, texts, engine.embed(texts)[0]
