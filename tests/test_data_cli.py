"""spectra data build | info through the CLI, and cross-process determinism."""

import json
import subprocess
import sys

from spectra.cli import main


def _corpus(path, n=200):
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"text": f"document {i} " + "lorem ipsum dolor sit amet " * (i % 7 + 1)}) + "\n")


def test_cli_build_and_info(tmp_path, capsys):
    _corpus(tmp_path / "c.jsonl")
    out = tmp_path / "d"
    rc = main(["data", "build", "--source", str(tmp_path / "c.jsonl"), "--out", str(out), "--vocab-size", "300",
               "--val-fraction", "0.1", "--no-progress"])
    assert rc == 0 and (out / "manifest.json").is_file()
    capsys.readouterr()
    assert main(["data", "info", str(out), "--verify"]) == 0
    text = capsys.readouterr().out
    assert "train" in text and "validation" in text and "uint16" in text and "all shards re-hashed: OK" in text
    assert "padded to 384" in text  # 300 -> multiple of 128
    assert main(["data", "info", str(out), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["format"] == "spectra-tokens"
    # re-run: no-op
    assert main(["data", "build", "--source", str(tmp_path / "c.jsonl"), "--out", str(out), "--vocab-size", "300",
                 "--val-fraction", "0.1", "--no-progress"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cli_bad_input_is_one_line_exit_2(tmp_path, capsys):
    assert main(["data", "build", "--source", str(tmp_path / "missing.txt"), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "missing.txt" in err and len(err.splitlines()) == 1
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{"txt": "no field"}\n')
    assert main(["data", "build", "--source", str(tmp_path / "bad.jsonl"), "--out", str(tmp_path / "d"),
                 "--no-progress"]) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert main(["data", "info", str(tmp_path)]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_builds_in_separate_processes_are_identical(tmp_path):
    _corpus(tmp_path / "c.jsonl", 300)
    code = ("import sys; from spectra.data import build_dataset, read_manifest; "
            "d = build_dataset(sys.argv[1], sys.argv[2], vocab_size=320, progress=False); "
            "print(read_manifest(d)['fingerprint'])")
    fps = [subprocess.run([sys.executable, "-c", code, str(tmp_path / "c.jsonl"), str(tmp_path / f"d{i}")],
                          capture_output=True, text=True, check=True).stdout.strip() for i in range(2)]
    assert fps[0] == fps[1] and len(fps[0]) == 32
    assert (tmp_path / "d0" / "tokenizer.json").read_bytes() == (tmp_path / "d1" / "tokenizer.json").read_bytes()
