"""`slotmem generate`: a playable mp4 + sidecar on the tiny preset, and clear errors for bad input."""

import json

import imageio.v3 as iio
import pytest

from slotmem.cli import main


def _script(tmp_path, lines):
    p = tmp_path / "script.jsonl"
    p.write_text("\n".join(lines) + "\n")
    return str(p)


def test_interactive_generate_writes_playable_mp4(tmp_path, repo_root, capsys):
    script = _script(tmp_path, ['{"prompt": "a red fox walks through snow"}',
                                '{"prompt": "the red fox leaps over a frozen stream"}'])
    out = tmp_path / "fox.mp4"
    rc = main(["generate", "--config", f"{repo_root}/configs/tiny-random.yaml", "--prompts", script,
               "--switch-frames", "12", "--num-frames", "24", "--seed", "1", "-o", str(out)])
    assert rc == 0
    frames = iio.imread(out)
    assert frames.shape == (4 * (24 - 1) + 1, 64, 64, 3)  # Wan VAE: 1 + 4 (F - 1) pixel frames
    meta = json.loads(out.with_suffix(".json").read_text())
    assert meta["switch_frames"] == [12] and meta["num_pixel_frames"] == 93 and meta["fps"] == 16
    assert [e["frame"] for e in meta["events"]] == [12]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.parametrize("args, needle", [
    (["--prompt", "x", "--prompts", "SCRIPT"], "exactly one of --prompt"),
    (["--prompts", "SCRIPT", "--switch-frames", "30,20"], "unsorted"),
    (["--prompts", "SCRIPT", "--switch-frames", "0,20"], "out of range"),
    (["--prompts", "SCRIPT", "--switch-frames", "12,300"], "beyond the video"),
    (["--prompts", "SCRIPT", "--switch-frames", "12"], "3 prompts need 2 switch frames"),
    (["--prompts", "SCRIPT", "--switch-frames", "a,b"], "comma-separated integers"),
    (["--prompts", "MISSING"], "MISSING"),
    (["--prompts", "BAD"], "BAD"),
    (["--prompt", "x", "--switch-frames", "12"], "needs an interactive script"),
])
def test_bad_input_gives_one_clear_error(tmp_path, repo_root, capsys, args, needle):
    script = _script(tmp_path, ['{"prompt": "a"}', '{"prompt": "b"}', '{"prompt": "c"}'])
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "a"}\n{"prompt": \n')
    subst = {"SCRIPT": script, "MISSING": str(tmp_path / "nope.jsonl"), "BAD": str(bad)}
    args = [subst.get(a, a) for a in args]
    needle = subst.get(needle, needle)
    rc = main(["generate", "--config", f"{repo_root}/configs/tiny-random.yaml", "--num-frames", "48", *args,
               "-o", str(tmp_path / "x.mp4")])
    err = capsys.readouterr().err
    assert rc == 2, err
    assert needle in err
    assert not (tmp_path / "x.mp4").exists()
