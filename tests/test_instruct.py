"""Instruction fine-tuning: data format, split, collate masks, scoring, the Ollama judge
(against a fake local server) and the whole command on a tiny random model.

Data comes from the data dir: export SCRATCHGPT_DATA_DIR=<the shared data folder>.
"""

from __future__ import annotations

import json
import socket
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import numpy as np
import pytest

from model.data.datadir import data_file
from model.data.instructions import (
    InstructionDataError,
    InstructionDataset,
    InstructionExample,
    collate,
    format_input,
    format_response,
    load_instruction_data,
    read_json_entries,
    split_data,
)
from model.instruct import main as instruct_main
from model.score_responses import main as score_main
from model.tasks.instruction import extract_response
from model.tasks.scoring import (
    JudgeError,
    exact_match,
    judge_prompt,
    lcs_length,
    normalize_text,
    ollama_reachable,
    parse_score,
    query_ollama,
    rouge_l,
    score_entries,
    token_f1,
)
from model.tokenizers.gpt2 import gpt2_tokenizer
from model.weights.checkpoint import load_model_from_checkpoint

P, X = 50256, -100  # pad / end-of-text id, ignored target


@pytest.fixture(scope="module")
def data() -> list[dict]:
    return load_instruction_data(data_file("instruction-data.json"))


# --- prompt format, split, loading ---
def test_format_input_matches_the_book(data):
    # The book prints entries 50 (with input) and 999 (without) in section 7.2.
    assert format_input(data[50]) + format_response(data[50]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nIdentify the correct spelling of the following word."
        "\n\n### Input:\nOcassion"
        "\n\n### Response:\nThe correct spelling is 'Occasion.'"
    )
    assert format_input(data[999]) + format_response(data[999]) == (
        "Below is an instruction that describes a task. Write a response that appropriately completes the request."
        "\n\n### Instruction:\nWhat is an antonym of 'complicated'?"
        "\n\n### Response:\nAn antonym of 'complicated' is 'simple'."
    )
    assert format_input({"instruction": "Hi", "output": "x"}) == format_input({"instruction": "Hi", "input": ""})


def test_split_sizes_and_order_as_the_book(data):
    assert len(data) == 1100
    train, test, val = split_data(list(range(1100)))
    assert (len(train), len(test), len(val)) == (935, 110, 55)
    assert train == list(range(935)) and test == list(range(935, 1045)) and val == list(range(1045, 1100))


def test_malformed_json_file_names_the_position(tmp_path):
    path = tmp_path / "bad.json"
    path.write_text('[{"instruction": "a", "output": "b"},\n {"instruction": ')
    with pytest.raises(InstructionDataError, match=r"bad\.json: not valid JSON \(line 2"):
        load_instruction_data(path)
    path.write_text('{"instruction": "a"}')
    with pytest.raises(InstructionDataError, match="expected a JSON list"):
        load_instruction_data(path)


def test_malformed_entries_are_named_not_skipped(tmp_path):
    path = tmp_path / "entries.json"
    entries = [
        {"instruction": "ok", "input": "", "output": "fine"},
        {"instruction": "no output", "input": ""},
        {"instruction": "x", "input": 3, "output": "y"},
        {"instruction": ["x"], "output": None},
        "not an object",
    ]
    path.write_text(json.dumps(entries))
    with pytest.raises(InstructionDataError) as err:
        load_instruction_data(path)
    message = str(err.value)
    assert "5 problem(s)" in message
    for expected in ("entry 1: field 'output' is missing", "entry 2: field 'input' must be a string, got int",
                     "entry 3: field 'instruction' must be a string, got list",
                     "entry 3: field 'output' must be a string, got NoneType", "entry 4: expected an object"):
        assert expected in message
    assert "entry 0" not in message


# --- collate ---
def test_collate_pads_and_masks_as_the_book():
    # The book's example batch (section 7.3), whose printed result this is.
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]])
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]])
    np.testing.assert_array_equal(targets, [[1, 2, 3, 4, P], [6, P, X, X, X], [8, 9, P, X, X]])
    assert inputs.dtype == targets.dtype == np.int64


def test_collate_truncates_and_masks_the_prompt():
    inputs, targets = collate([[0, 1, 2, 3, 4], [5, 6], [7, 8, 9]], allowed_max_length=3)
    np.testing.assert_array_equal(inputs, [[0, 1, 2], [5, 6, P], [7, 8, 9]])
    np.testing.assert_array_equal(targets, [[1, 2, 3], [6, P, X], [8, 9, P]])
    batch = [InstructionExample([0, 1, 2, 3, 4], 3), InstructionExample([5, 6], 1), InstructionExample([7, 8, 9], 3)]
    inputs, targets = collate(batch, mask_prompt=True)
    np.testing.assert_array_equal(inputs, [[0, 1, 2, 3, 4], [5, 6, P, P, P], [7, 8, 9, P, P]])
    # target i predicts token i + 1: with a 3-token prompt the first 2 targets are prompt tokens
    np.testing.assert_array_equal(targets, [[X, X, 3, 4, P], [6, P, X, X, X], [X, X, P, X, X]])
    np.testing.assert_array_equal(collate(batch)[1], [[1, 2, 3, 4, P], [6, P, X, X, X], [8, 9, P, X, X]])
    with pytest.raises(TypeError, match="mask_prompt needs InstructionExample"):
        collate([[1, 2]], mask_prompt=True)


def test_dataset_prompt_mask_leaves_exactly_the_response(data):
    tokenizer = gpt2_tokenizer()
    dataset = InstructionDataset(data[50:52], tokenizer)
    _, targets = collate([dataset[0], dataset[1]], mask_prompt=True)
    kept = [int(t) for t in targets[0] if t != X]
    assert kept[-1] == P
    assert tokenizer.decode(kept[:-1]) == format_response(data[50])
    assert tokenizer.decode(dataset[0].ids[:dataset[0].prompt_length]) == format_input(data[50])


# --- overlap scores ---
def test_normalisation_and_exact_match():
    assert normalize_text("  The Cat, sat!\n\tOn 'it'. ") == "the cat sat on it"
    assert exact_match("The cat sat.", "the  CAT sat") == 1.0
    assert exact_match("The cat sat.", "the cat sits") == 0.0


def test_token_f1_and_rouge_l_by_hand():
    # 6 tokens each, bag overlap {the: 2, cat, on, mat} = 5 -> P = R = F1 = 5/6; the LCS is also 5.
    assert token_f1("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    assert rouge_l("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # Same bag, different order: F1 1, LCS 2 of 3 -> ROUGE-L 2/3.
    assert token_f1("b a c", "a b c") == 1.0
    assert rouge_l("b a c", "a b c") == pytest.approx(2 / 3)
    # P = 1/1, R = 1/4 -> 2 * 1 * 0.25 / 1.25 = 0.4 for both.
    assert token_f1("Paris", "It is in Paris.") == pytest.approx(0.4)
    assert rouge_l("Paris", "It is in Paris.") == pytest.approx(0.4)
    assert token_f1("", "") == rouge_l("", "") == 1.0
    assert token_f1("x", "") == rouge_l("", "x") == 0.0
    assert token_f1("a b", "c d") == rouge_l("a b", "c d") == 0.0
    assert lcs_length(list("ABCBDAB"), list("BDCABA")) == 4


def test_extract_response_and_parse_score():
    assert extract_response("\n\n### Response:\nThe answer is 4. \n") == "The answer is 4."
    assert extract_response("  no header  ") == "no header"
    assert [parse_score(r) for r in ("85", " 85.\n", "Score: 70", "90/100", "100", "0")] == [85, 85, 70, 90, 100, 0]
    assert [parse_score(r) for r in ("", "good", "85 or 90", "101", "-3", "72.5")] == [None] * 6


# --- the LLM judge, against a fake Ollama ---
class _FakeOllama(BaseHTTPRequestHandler):
    replies: list[str] = []
    requests: list[dict] = []

    def do_GET(self):  # noqa: N802 (http.server's name)
        self._send(200, b"Ollama is running")

    def do_POST(self):  # noqa: N802
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        self.requests.append({"path": self.path, "body": body})
        if body["model"] == "missing":
            self._send(404, json.dumps({"error": "model 'missing' not found"}).encode())
            return
        reply = self.replies[(len(self.requests) - 1) % len(self.replies)]
        # streamed as Ollama does: one JSON object per line, the reply split over chunks
        chunks = [reply[:1], reply[1:]]
        lines = [{"model": body["model"], "message": {"role": "assistant", "content": c}, "done": False}
                 for c in chunks]
        lines.append({"model": body["model"], "message": {"role": "assistant", "content": ""}, "done": True})
        self._send(200, "".join(json.dumps(line) + "\n" for line in lines).encode(), "application/x-ndjson")

    def _send(self, code, payload, kind="text/plain"):
        self.send_response(code)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(payload)))
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args):
        pass


@pytest.fixture
def fake_ollama():
    _FakeOllama.replies, _FakeOllama.requests = ["85", "I would rather not say."], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FakeOllama)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


def _entries() -> list[dict]:
    return [
        {"instruction": "Name the capital of France.", "input": "", "output": "Paris.", "model_response": "Paris"},
        {"instruction": "Add.", "input": "2 + 2", "output": "4", "model_response": "5"},
    ]


def test_judge_scores_through_the_chat_api(fake_ollama):
    logs = []
    scored = score_entries(_entries(), judge=True, judge_model="llama3", ollama_url=fake_ollama, progress=False,
                           log=logs.append)
    first = _FakeOllama.requests[0]
    assert first["path"] == "/api/chat"
    assert first["body"] == {"model": "llama3", "messages": [{"role": "user", "content": judge_prompt(_entries()[0])}],
                             "options": {"seed": 123, "temperature": 0, "num_ctx": 2048}}
    assert judge_prompt(_entries()[0]).startswith("Given the input `Below is an instruction")
    assert judge_prompt(_entries()[0]).endswith(
        "and correct output `Paris.`, score the model response `Paris` on a scale from 0 to 100, where 100 is the "
        "best score. Respond with the integer number only.")
    assert scored["summary"]["judge"] == {"model": "llama3", "mean": 85.0, "count": 1, "unparseable": 1}
    assert [e["scores"]["judge_score"] for e in scored["entries"]] == [85, None]
    assert scored["entries"][1]["scores"]["judge_reply"] == "I would rather not say."
    assert scored["summary"]["exact_match"] == {"mean": 0.5, "count": 2}
    assert any("1 judge reply held no 0-100 score" in line for line in logs)
    assert any("entry 1: 'I would rather not say.'" in line for line in logs)
    with pytest.raises(JudgeError, match="HTTP 404: model 'missing' not found"):
        query_ollama("hi", model="missing", url=fake_ollama + "/api/chat")


def test_judge_unreachable_is_skipped_with_a_clear_message():
    with socket.socket() as s:  # a port nobody listens on once this closes
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert not ollama_reachable(url, timeout=1.0)
    logs = []
    scored = score_entries(_entries(), judge=True, ollama_url=url, progress=False, log=logs.append)
    assert logs[0] == (f"no Ollama server reachable at {url} — skipping LLM-as-judge; start one with `ollama serve` "
                       "and pull the model (`ollama pull llama3`)")
    assert "judge" not in scored["summary"]


# --- the commands end to end ---
def test_instruct_pipeline_end_to_end_on_a_tiny_model(tmp_path, capsys):
    out = tmp_path / "run"
    code = instruct_main(["--preset", "tiny", "--max-steps", "2", "--max-test-entries", "3", "--max-new-tokens", "6",
                          "--batch-size", "2", "--eval-iters", "1", "--max-length", "48", "--mask-prompt",
                          "--no-sample", "--no-progress", "--out-dir", str(out)])
    assert code == 0
    responses = json.loads((out / "instruction-data-with-response.json").read_text())
    assert len(responses) == 3
    assert all(set(e) == {"instruction", "input", "output", "model_response"} for e in responses)
    assert all(isinstance(e["model_response"], str) for e in responses)
    assert responses[0]["output"] == "The car is as fast as lightning."  # test split starts at entry 935
    scores = json.loads((out / "scores.json").read_text())
    assert scores["summary"]["rouge_l"]["count"] == 3
    assert (out / "loss.png").stat().st_size > 0
    model, ckpt = load_model_from_checkpoint(out / "checkpoint")
    assert ckpt.step == 2 and model.config.context_length == 64
    assert ckpt.extra["prompt_template"] == "alpaca"  # what chat and generate apply
    capsys.readouterr()

    assert instruct_main(["--evaluate", str(out / "instruction-data-with-response.json"), "--no-progress"]) == 0
    assert "ROUGE-L F" in capsys.readouterr().out
    assert score_main([str(out / "instruction-data-with-response.json"), "--out", str(tmp_path / "s.json")]) == 0
    assert json.loads((tmp_path / "s.json").read_text())["summary"] == scores["summary"]


def test_commands_report_bad_files(tmp_path, capsys):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"instruction": "a", "input": "", "output": "b"}, {"instruction": "c"}]))
    assert instruct_main(["--preset", "tiny", "--data-file", str(bad), "--out-dir", str(tmp_path / "x")]) == 2
    assert "entry 1: field 'output' is missing" in capsys.readouterr().err
    assert score_main([str(bad)]) == 2
    assert "field 'model_response' is missing" in capsys.readouterr().err
    assert read_json_entries(bad, required=("instruction",)) == json.loads(bad.read_text())


def test_instruct_with_lora_saves_adapters_and_a_merged_checkpoint(tmp_path):
    out = tmp_path / "lora"
    code = instruct_main(["--preset", "tiny", "--lora-rank", "2", "--lora-alpha", "4", "--lr", "1e-2",
                          "--max-steps", "1", "--max-test-entries", "1", "--max-new-tokens", "2", "--batch-size", "2",
                          "--eval-iters", "1", "--max-length", "32", "--no-sample", "--no-progress",
                          "--out-dir", str(out)])
    assert code == 0
    assert (out / "lora.safetensors").is_file() and (out / "lora.json").is_file()
    model, _ = load_model_from_checkpoint(out / "checkpoint")  # merged: plain GPT-2 names
    assert "h.0.attn.c_attn.weight" in model.state_dict()
    assert len(json.loads((out / "instruction-data-with-response.json").read_text())) == 1
