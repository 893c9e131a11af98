"""rank_models and the `rank` command line."""
from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch

from torch_logme import Ranking, gbc, h_score, leep, logme, nce, rank_models, transrate
from torch_logme.__main__ import main
from torch_logme.ranking import SCORES, ModelScoreError, model_names

from conftest import make_features

F, Y = make_features(200, 10, 3, seed=0)
NOISE = np.random.default_rng(1).standard_normal((200, 10))
WEAK = F[:, :3] + 2.0 * np.random.default_rng(2).standard_normal((200, 3))


def _probs(sharp, seed):
    """Source probabilities [200, 5] whose argmax follows Y more or less closely."""
    logits = np.random.default_rng(seed).standard_normal((200, 5)) + sharp * np.eye(5)[Y]
    e = np.exp(logits - logits.max(1, keepdims=True))
    return e / e.sum(1, keepdims=True)


def test_rank_models_orders_best_first(device):
    models = {"noise": NOISE, "good": F, "weak": WEAK}
    on = {k: torch.from_numpy(v).to(device) for k, v in models.items()}
    ranking = rank_models(on, torch.from_numpy(Y).to(device), scores=("logme", "gbc", "h_score"))
    assert isinstance(ranking, Ranking)
    assert ranking.models == ["good", "weak", "noise"] and ranking.best == "good"
    assert [e.rank for e in ranking] == [1, 2, 3]
    assert ranking[0].scores["logme"] == pytest.approx(float(logme(F, Y)), rel=1e-12)
    assert ranking[0].scores["gbc"] == pytest.approx(float(gbc(F, Y)), rel=1e-12)
    values = [e.scores["logme"] for e in ranking]
    assert values == sorted(values, reverse=True)
    lines = str(ranking).splitlines()
    assert "ranked by logme" in lines[0] and "larger is better" in lines[0]
    assert lines[1].split() == ["rank", "model", "logme", "gbc", "h_score"]
    assert [line.split()[1] for line in lines[3:]] == ["good", "weak", "noise"]


def test_rank_by_another_score_and_list_input():
    ranking = rank_models([NOISE, F], Y, scores="h_score")
    assert ranking.models == ["model_1", "model_0"]
    assert ranking.scores == ("h_score",)
    assert ranking[0].scores["h_score"] == pytest.approx(float(h_score(F, Y)))
    d = ranking.to_dict()
    assert d["ranked_by"] == "h_score" and d["larger_is_better"] == {"h_score": True}
    assert [row["model"] for row in d["ranking"]] == ["model_1", "model_0"]
    assert json.loads(ranking.to_json())["ranking"][0]["rank"] == 1


def test_leep_and_nce_read_probabilities():
    sharp, vague = _probs(4.0, 3), _probs(0.3, 4)
    ranking = rank_models({"vague": vague, "sharp": sharp}, Y, scores=("leep", "nce"))
    assert ranking.models == ["sharp", "vague"]
    assert ranking[0].scores["leep"] == pytest.approx(float(leep(sharp, Y)))
    assert ranking[0].scores["nce"] == pytest.approx(float(nce(sharp.argmax(1), Y)))
    # A model may carry features and probabilities together.
    both = {"a": {"features": F, "probs": sharp}, "b": {"features": NOISE, "probs": vague}}
    mixed = rank_models(both, Y, scores=("logme", "leep"))
    assert mixed.models == ["a", "b"]
    with pytest.raises(ModelScoreError, match="'a'.*'probs'"):
        rank_models({"a": {"features": F}}, Y, scores="leep")
    with pytest.raises(ModelScoreError, match="model 'f', score 'leep'.*sum to 1"):
        rank_models({"f": np.abs(F)}, Y, scores="leep")  # features are no probabilities


def test_ties_and_nan_rank_last(monkeypatch):
    from types import MappingProxyType

    from torch_logme import ranking, registry

    fake = ranking.ScoreSpec(lambda x, y, **kw: torch.tensor(float(x[0, 0])), "features", True, "test", name="fake")
    with_fake = MappingProxyType({**registry.SCORES, "fake": fake})
    monkeypatch.setattr(registry, "SCORES", with_fake)
    monkeypatch.setattr(ranking, "SCORES", with_fake)
    models = {"nan": np.full((2, 1), np.nan), "one": np.ones((2, 1)), "also_one": np.ones((2, 1)),
              "two": np.full((2, 1), 2.0)}
    ranking = rank_models(models, np.zeros(2, dtype=int), scores="fake")
    assert ranking.models == ["two", "one", "also_one", "nan"]
    assert ranking.to_dict()["ranking"][-1]["fake"] is None


@pytest.mark.parametrize(
    "args, kwargs, exc, fragment",
    [
        (({"a": F}, Y), {"scores": "bogus"}, ValueError, "unknown score"),
        (({"a": F}, Y), {"scores": ()}, ValueError, "at least one"),
        (({"a": F}, Y), {"scores": ("gbc", "gbc")}, ValueError, "repeated"),
        (({}, Y), {}, ValueError, "empty"),
        ((F, Y), {}, TypeError, "dict of name"),
        (({"a": F}, Y - 1), {}, ValueError, "non-negative"),
        (({"a": F, "short": F[:50]}, Y), {}, ModelScoreError, "'short'.*disagree on N"),
        (({"a": F}, Y), {"score_options": {"gbc": {}}}, ValueError, "not requested"),
    ],
)
def test_rank_models_errors(args, kwargs, exc, fragment):
    with pytest.raises(exc, match=fragment):
        rank_models(*args, **kwargs)


def test_score_options():
    ranking = rank_models({"a": F}, Y, scores="transrate", score_options={"transrate": {"eps": 1e-2}})
    assert ranking[0].scores["transrate"] == pytest.approx(float(transrate(F, Y, eps=1e-2)))
    # The scores the CLI and ranking accept by name: every registered one.
    assert {"logme", "leep", "nce", "h_score", "regularized_h_score", "transrate", "gbc", "sfda", "ncti", "nleep",
            "etran", "knn", "parc"} <= set(SCORES)


def test_model_names():
    from pathlib import Path

    assert model_names([Path("a/x.npy"), Path("b/y.pt")]) == ["x", "y"]
    assert model_names([Path("r/a/feat.npy"), Path("r/b/feat.npy")]) == ["a/feat", "b/feat"]


# -- the command line ----------------------------------------------------------------


@pytest.fixture
def files(tmp_path):
    np.save(tmp_path / "good.npy", F)
    np.save(tmp_path / "noise.npy", NOISE)
    torch.save(torch.from_numpy(WEAK).float(), tmp_path / "weak.pt")
    np.savez(tmp_path / "both.npz", features=F, probs=_probs(4.0, 3))
    np.savez(tmp_path / "labels.npz", labels=Y, other=np.zeros(3))
    np.save(tmp_path / "labels.npy", Y)
    return tmp_path


def test_cli_table(files, capsys):
    status = main(["rank", str(files / "noise.npy"), str(files / "good.npy"), str(files / "weak.pt"),
                   "--labels", str(files / "labels.npy"), "--score", "logme", "gbc"])
    out = capsys.readouterr().out
    assert status == 0
    lines = out.splitlines()
    assert lines[1].split() == ["rank", "model", "logme", "gbc"]
    assert [line.split()[1] for line in lines[3:]] == ["good", "weak", "noise"]


def test_cli_json(files, capsys):
    status = main(["rank", str(files / "noise.npy"), str(files / "both.npz"), "--labels", str(files / "labels.npz"),
                   "--json", "--score", "h_score", "--score", "transrate"])
    assert status == 0
    out = json.loads(capsys.readouterr().out)
    assert out["ranked_by"] == "h_score" and out["scores"] == ["h_score", "transrate"]
    assert [r["model"] for r in out["ranking"]] == ["both", "noise"]
    assert out["ranking"][0]["file"].endswith("both.npz")
    assert out["ranking"][0]["h_score"] == pytest.approx(float(h_score(F, Y)))


def test_cli_leep_from_npz(files, capsys):
    assert main(["rank", str(files / "both.npz"), "--labels", str(files / "labels.npy"), "--score", "leep"]) == 0
    assert "both" in capsys.readouterr().out


@pytest.mark.parametrize(
    "name, make, fragment",
    [
        ("bad.npy", lambda p: p.write_bytes(b"not an array"), "bad.npy: cannot read"),
        ("bad.pt", lambda p: p.write_bytes(b"not a checkpoint"), "bad.pt: cannot read"),
        ("bad.npy", lambda p: np.save(p, F[:150]), "bad.npy: has 150 rows, but the labels"),
        ("bad.npy", lambda p: np.save(p, F[:, 0]), r"bad.npy \(logme\):.*2-D"),
        ("bad.npz", lambda p: np.savez(p, a=F, b=F), "bad.npz: holds several arrays"),
        ("bad.txt", lambda p: p.write_text("1 2 3"), "bad.txt: unknown file type"),
        ("bad.npy", lambda p: None, "bad.npy: no such file"),
    ],
)
def test_cli_bad_feature_files(files, capsys, name, make, fragment):
    make(files / name)
    status = main(["rank", str(files / "good.npy"), str(files / name), "--labels", str(files / "labels.npy")])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("torch-logme rank: error:") and re.search(fragment, err), err
    assert "Traceback" not in err


def test_cli_bad_labels(files, capsys):
    np.save(files / "neg.npy", Y - 1)
    assert main(["rank", str(files / "good.npy"), "--labels", str(files / "neg.npy")]) == 1
    err = capsys.readouterr().err
    assert "neg.npy" in err and "non-negative" in err
    np.savez(files / "many.npz", a=Y, b=Y)
    assert main(["rank", str(files / "good.npy"), "--labels", str(files / "many.npz")]) == 1
    assert "many.npz" in capsys.readouterr().err


def test_cli_unknown_score_is_a_usage_error(files, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["rank", str(files / "good.npy"), "--labels", str(files / "labels.npy"), "--score", "bogus"])
    assert exit_info.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_cli_subprocess_no_traceback(files):
    # The real entry point: exit status and stderr as a user sees them.
    (files / "broken.npz").write_bytes(b"PK\x03\x04 truncated")
    proc = subprocess.run(
        [sys.executable, "-m", "torch_logme", "rank", str(files / "broken.npz"), "--labels", str(files / "labels.npy")],
        capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 1
    assert "broken.npz" in proc.stderr and "Traceback" not in proc.stderr


# -- reliability under faults: rank_models errors, files by identity, lazy .npz, devices --------


def test_rank_models_wraps_linalg_errors(monkeypatch):
    from types import MappingProxyType

    from torch_logme import ranking, registry

    def failing(x, y, **kw):
        raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")

    fake = ranking.ScoreSpec(failing, "features", True, "test", name="fails")
    with_fake = MappingProxyType({**registry.SCORES, "fails": fake})
    monkeypatch.setattr(registry, "SCORES", with_fake)
    monkeypatch.setattr(ranking, "SCORES", with_fake)
    with pytest.raises(ModelScoreError, match="model 'bad', score 'fails': linalg.eigh") as info:
        rank_models({"bad": F}, Y, scores="fails")
    assert info.value.model == "bad" and info.value.score == "fails"
    assert isinstance(info.value.__cause__, torch.linalg.LinAlgError)


def test_cli_labels_beside_the_features_are_not_a_model(files, capsys):
    # `rank *.npy --labels labels.npy`, as the README shows it: the glob matches the labels too.
    paths = sorted(str(p) for p in files.glob("*.npy"))
    assert str(files / "labels.npy") in paths
    assert main(["rank", *paths, "--labels", str(files / "labels.npy"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert sorted(r["model"] for r in out["ranking"]) == ["good", "noise"]
    # The same file by another path is still the labels file.
    assert main(["rank", str(files / "good.npy"), str(files / "." / ".." / files.name / "labels.npy"),
                 "--labels", str(files / "labels.npy")]) == 0
    assert [line.split()[1] for line in capsys.readouterr().out.splitlines()[3:]] == ["good"]
    assert main(["rank", str(files / "labels.npy"), "--labels", str(files / "labels.npy")]) == 1
    err = capsys.readouterr().err
    assert "no features files" in err and "labels.npy" in err


def test_cli_compares_files_by_identity_not_stem(files, capsys, monkeypatch):
    torch.save(torch.from_numpy(NOISE), files / "good.pt")  # another file, the same stem as good.npy
    assert main(["rank", str(files / "good.npy"), str(files / "good.pt"), "--labels", str(files / "labels.npy"),
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert [(r["model"], r["file"]) for r in out["ranking"]] == [
        ("good.npy", str(files / "good.npy")), ("good.pt", str(files / "good.pt"))]
    # One file under two names is one model given twice, whatever the names.
    monkeypatch.chdir(files)
    assert main(["rank", "good.npy", str(files / "good.npy"), "--labels", "labels.npy"]) == 1
    err = capsys.readouterr().err
    assert "the same file is given twice" in err and "Traceback" not in err
    (files / "link.npy").symlink_to(files / "noise.npy")
    assert main(["rank", "noise.npy", "link.npy", "--labels", "labels.npy"]) == 1
    assert "the same file is given twice: noise.npy and link.npy" in capsys.readouterr().err


def test_model_names_keep_the_suffix_only_when_stems_clash():
    from pathlib import Path

    assert model_names([Path("d/same.npy"), Path("d/same.pt"), Path("d/other.npy")]) == [
        "same.npy", "same.pt", "other"]
    assert model_names([Path("a/x.npy"), Path("b/x.npy"), Path("b/x.pt")]) == ["x", "x.npy", "x.pt"]
    with pytest.raises(ValueError, match="the same file is given twice: a/x$"):
        model_names([Path("a/x.npy"), Path("a/x.npy")])


def _npz_with_a_broken_member(path, **arrays):
    """An .npz of ``arrays`` plus a member 'unused': the header of a 1.6 GB array, without its data."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w") as archive:
        for name, value in arrays.items():
            buffer = io.BytesIO()
            np.save(buffer, value)
            archive.writestr(f"{name}.npy", buffer.getvalue())
        header = io.BytesIO()
        np.lib.format.write_array_header_1_0(header, {"descr": "<f8", "fortran_order": False, "shape": (200_000_000,)})
        archive.writestr("unused.npy", header.getvalue() + b"\0" * 64)  # truncated: reading it fails


def test_npz_reads_only_the_arrays_it_uses(files, capsys, monkeypatch):
    # An unused array is never read: a broken one does no harm, a huge one costs no memory.
    _npz_with_a_broken_member(files / "model.npz", features=F, probs=_probs(4.0, 3))
    _npz_with_a_broken_member(files / "targets.npz", labels=Y)
    read = []
    real_getitem = np.lib.npyio.NpzFile.__getitem__

    def spy(self, key):
        read.append(key)
        return real_getitem(self, key)

    monkeypatch.setattr(np.lib.npyio.NpzFile, "__getitem__", spy)
    assert main(["rank", str(files / "model.npz"), "--labels", str(files / "targets.npz"), "--score", "logme"]) == 0
    assert "model" in capsys.readouterr().out
    assert sorted(read) == ["features", "labels", "probs"]  # each used array read once, the unused never
    # The member itself still fails, on one line that names the file and the array, when it is used.
    _npz_with_a_broken_member(files / "only.npz")
    assert main(["rank", str(files / "only.npz"), "--labels", str(files / "labels.npy")]) == 1
    err = capsys.readouterr().err
    assert "only.npz: cannot read its array 'unused'" in err and "Traceback" not in err


def test_cli_unusable_device_is_one_line(files, capsys):
    # cuda:99 exists nowhere: a CPU-only torch and a GPU torch both refuse it.
    status = main(["rank", str(files / "good.npy"), "--labels", str(files / "labels.npy"), "--device", "cuda:99"])
    err = capsys.readouterr().err
    assert status == 1
    assert err.startswith("torch-logme rank: error: device 'cuda:99' cannot be used")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_a_pooled_score_is_combined_across_the_models_ranked(pooled_score):
    from torch_logme import gbc, h_score

    gen = torch.Generator().manual_seed(3)
    labels = torch.randint(0, 3, (90,), generator=gen)
    models = {
        f"m{i}": torch.randn(90, 6, generator=gen, dtype=torch.float64) + s * labels[:, None]
        for i, s in enumerate([0.0, 0.5, 2.0, 1.0])
    }
    ranking = rank_models(models, labels, scores=[pooled_score, "logme"])
    terms = torch.tensor([[float(h_score(f, labels)), float(gbc(f, labels))] for f in models.values()],
                         dtype=torch.float64)
    want = ((terms - terms.amin(0)) / (terms.amax(0) - terms.amin(0))).sum(1)
    got = {e.name: e.scores for e in ranking}
    for (name, _), value, (h, g) in zip(models.items(), want.tolist(), terms.tolist()):
        assert got[name][pooled_score] == pytest.approx(value, rel=1e-12)
        assert got[name][f"{pooled_score}.h"] == pytest.approx(h, rel=1e-12)
        assert got[name][f"{pooled_score}.gbc"] == pytest.approx(g, rel=1e-12)
    assert ranking.models == [list(models)[i] for i in torch.argsort(want, descending=True).tolist()]
    assert "across the 4 models ranked" in str(ranking) and ranking.to_dict()["notes"]
    assert ranking.to_dict()["ranking"][0][f"{pooled_score}.h"] is not None
