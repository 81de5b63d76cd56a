"""--hf-model for Llama 3 / Qwen3 repos without the internet: tiny generated folders served by a
local HTTP server that answers ``/<repo>/resolve/main/<file>`` as the Hub does (Range requests,
401 for a gated repo without the right token, 404 for a missing file)."""

from __future__ import annotations

import http.server
import threading
from pathlib import Path

import pytest

from model.weights.hub import HFDownloadError, download_hf_model

pytest.importorskip("transformers")

TOKEN = "hf_secret"
GATED = "meta-llama/Tiny-Llama"


class HubHandler(http.server.BaseHTTPRequestHandler):
    repos: dict[str, Path] = {}
    requests: list[tuple[str, str | None, str | None]] = []  # (path, Authorization, Range)

    def log_message(self, *args) -> None:  # quiet
        pass

    def do_GET(self) -> None:
        self.requests.append((self.path, self.headers.get("Authorization"), self.headers.get("Range")))
        repo, _, name = self.path.lstrip("/").partition("/resolve/main/")
        if repo == GATED and self.headers.get("Authorization") != f"Bearer {TOKEN}":
            return self.send_error(401)
        path = self.repos[repo] / name if repo in self.repos else None
        if path is None or not path.is_file():
            return self.send_error(404)
        data, start = path.read_bytes(), 0
        if self.headers.get("Range"):
            start = int(self.headers["Range"].removeprefix("bytes=").rstrip("-"))
            if start >= len(data):
                return self.send_error(416)
        self.send_response(206 if start else 200)
        if start:
            self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        self.send_header("Content-Length", str(len(data) - start))
        self.end_headers()
        self.wfile.write(data[start:])


@pytest.fixture(scope="module")
def hub(tmp_path_factory):
    """(endpoint URL, handler class) serving a tiny Llama (also as the gated repo) and a sharded Qwen3."""
    from tests.fixtures.make_tiny_llama_qwen import make_tiny_folder

    root = tmp_path_factory.mktemp("hub")
    llama = make_tiny_folder("llama", root / "llama")
    HubHandler.repos = {"owner/tiny-llama": llama, GATED: llama,
                        "owner/tiny-qwen3-sharded": make_tiny_folder("qwen3", root / "qwen3", shard=True)}
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), HubHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}", HubHandler
    server.shutdown()
    server.server_close()
    thread.join()


@pytest.fixture
def endpoint(hub, monkeypatch):
    url, handler = hub
    monkeypatch.setenv("SCRATCHGPT_HF_ENDPOINT", url)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    handler.requests.clear()
    return handler


def files_of(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_a_folder_is_downloaded_once_and_generates_as_with_hf_dir(endpoint, tmp_path, capsys):
    from model import generate

    folder = download_hf_model("owner/tiny-llama", tmp_path)
    assert folder == tmp_path / "owner" / "tiny-llama"
    assert files_of(folder) == files_of(endpoint.repos["owner/tiny-llama"])  # nothing partial left beside them
    assert [p for p, _, _ in endpoint.requests][0] == "/owner/tiny-llama/resolve/main/config.json"
    assert all(auth is None for _, auth, _ in endpoint.requests)  # no HF_TOKEN set: none sent
    endpoint.requests.clear()
    assert download_hf_model("owner/tiny-llama", tmp_path) == folder
    assert endpoint.requests == []  # complete: no request at all

    flags = ["--prompt", "Jack Gisburn", "--max-new-tokens", "6", "--backend", "numpy"]
    generate.main(flags + ["--hf-model", "owner/tiny-llama", "--cache-dir", str(tmp_path)])
    ours = capsys.readouterr()
    generate.main(flags + ["--hf-dir", str(endpoint.repos["owner/tiny-llama"])])
    theirs = capsys.readouterr()
    assert ours.out == theirs.out and ours.out.strip()  # the reply, as the chat template is applied
    assert "prompt template llama3 applied" in ours.err and "prompt template llama3 applied" in theirs.err
    assert endpoint.requests == []


def test_a_sharded_folder_brings_its_index_and_every_shard(endpoint, tmp_path):
    from model.decoder import load_hf_model

    source = endpoint.repos["owner/tiny-qwen3-sharded"]
    assert len(list(source.glob("model-*.safetensors"))) > 1
    folder = download_hf_model("owner/tiny-qwen3-sharded", tmp_path)
    assert files_of(folder) == files_of(source)
    fetched = [p.rsplit("/", 1)[1] for p, _, _ in endpoint.requests]
    assert fetched[:4] == ["config.json", "tokenizer.json", "tokenizer_config.json", "generation_config.json"]
    assert fetched[4:6] == ["model.safetensors", "model.safetensors.index.json"]  # 404, then the index
    assert sorted(fetched[6:]) == sorted(p.name for p in source.glob("model-*.safetensors"))
    load_hf_model(folder)


def test_an_interrupted_download_is_resumed_and_never_looks_complete(endpoint, tmp_path):
    source = endpoint.repos["owner/tiny-llama"] / "model.safetensors"
    folder = tmp_path / "owner" / "tiny-llama"
    folder.mkdir(parents=True)
    half = source.stat().st_size // 2
    (folder / ".model.safetensors.incomplete").write_bytes(source.read_bytes()[:half])  # a killed download
    assert not (folder / "model.safetensors").exists()
    download_hf_model("owner/tiny-llama", tmp_path)
    assert ("/owner/tiny-llama/resolve/main/model.safetensors", None, f"bytes={half}-") in endpoint.requests
    assert (folder / "model.safetensors").read_bytes() == source.read_bytes()
    assert not list(folder.glob(".*"))

    # a partial file that is already whole (killed before its rename): the server says 416, start over
    (folder / "config.json").unlink()
    (folder / "model.safetensors").rename(folder / ".model.safetensors.incomplete")
    download_hf_model("owner/tiny-llama", tmp_path)
    assert (folder / "model.safetensors").read_bytes() == source.read_bytes()


def test_a_gated_repo_needs_hf_token(endpoint, tmp_path, monkeypatch, capsys):
    from model import generate

    with pytest.raises(HFDownloadError) as refused:
        download_hf_model(GATED, tmp_path)
    message = str(refused.value)
    assert "HTTP 401" in message and "no HF_TOKEN was set" in message and "\n" not in message
    assert f"https://huggingface.co/{GATED}" in message and "set HF_TOKEN" in message and "--hf-dir" in message
    assert not (tmp_path / GATED / "config.json").exists()

    monkeypatch.setenv("HF_TOKEN", "wrong")
    with pytest.raises(SystemExit) as exit_info:
        generate.main(["--hf-model", GATED, "--cache-dir", str(tmp_path), "--backend", "numpy"])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "the HF_TOKEN sent was refused" in err and err.count("\n") == 1

    monkeypatch.setenv("HF_TOKEN", TOKEN)
    endpoint.requests.clear()
    assert files_of(download_hf_model(GATED, tmp_path)) == files_of(endpoint.repos[GATED])
    assert {auth for _, auth, _ in endpoint.requests} == {f"Bearer {TOKEN}"}


def test_offline_names_hf_dir_and_exits_2(endpoint, tmp_path, monkeypatch, capsys):
    from model import chat

    monkeypatch.setenv("SCRATCHGPT_HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens
    with pytest.raises(HFDownloadError, match="Offline.*--hf-dir DIR instead of --hf-model owner/tiny-llama"):
        download_hf_model("owner/tiny-llama", tmp_path)
    assert chat.main(["--hf-model", "owner/tiny-llama", "--cache-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not download") and err.count("\n") == 1


def test_what_hf_model_refuses(endpoint, tmp_path, capsys):
    from model import chat

    with pytest.raises(HFDownloadError, match="HTTP 404: no such repo"):
        download_hf_model("owner/none", tmp_path)
    (tmp_path / "bert").mkdir()
    (tmp_path / "bert" / "config.json").write_text('{"model_type": "bert"}')
    endpoint.repos["owner/bert"] = tmp_path / "bert"
    with pytest.raises(HFDownloadError, match="owner/bert is a 'bert' model; --hf-model takes gpt2, llama, qwen3"):
        download_hf_model("owner/bert", tmp_path / "cache")
    assert list((tmp_path / "cache" / "owner" / "bert").iterdir()) == []  # no weights asked for, nothing kept
    assert [p for p, _, _ in endpoint.requests][-1] == "/owner/bert/resolve/main/config.json"
    with pytest.raises(ValueError, match="not a Hugging Face repo id"):
        download_hf_model("../etc", tmp_path)
    for argv in (["--hf-model", "a/b/c"], ["x", "--hf-model", "a/b"], []):
        with pytest.raises(SystemExit) as exit_info:
            chat.main(argv)
        assert exit_info.value.code == 2
    assert "not a Hugging Face repo id" in capsys.readouterr().err
