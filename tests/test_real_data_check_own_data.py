"""The yardstick on a config's own photos (`--config-data`): a folder source, end to end."""

import json

import numpy as np
import yaml

# Folder names are label sets (folder source, "_" separates labels); colour says the labels.
COLOURS = {"red": (220, 30, 30), "green": (30, 200, 40), "blue": (30, 40, 220)}
FOLDERS = ("red", "green", "blue", "red_green", "green_blue")


def _photos(root, per_folder=6):
    from PIL import Image

    rng = np.random.default_rng(0)
    for folder in FOLDERS:
        (root / folder).mkdir(parents=True)
        colours = [np.array(COLOURS[name]) for name in folder.split("_")]
        for i in range(per_folder):
            pixels = rng.normal(0, 20, (32, 32, 3))
            pixels[:, :16] += colours[0]
            pixels[:, 16:] += colours[-1]
            Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(root / folder / f"{i}.jpg")
    (root / "red" / "broken.jpg").write_bytes(b"not a jpeg")


def test_config_data_cross_validates_the_configs_own_photos(tmp_path, capsys, caplog, yardstick):
    _photos(tmp_path / "photos")
    config = {
        "data": {"source": "folder", "train_path": str(tmp_path / "photos"), "val_fraction": 0.2},
        "model": {"backbone": "small_cnn", "image_size": 32, "head": "bce"},
        "train": {"epochs": 1, "frozen_epochs": 1, "batch_size": 4},
    }
    config_path = tmp_path / "photos.yaml"
    config_path.write_text(yaml.safe_dump(config))
    out = tmp_path / "check.json"

    assert yardstick.main(["--config", str(config_path), "--config-data", "--heads", "bce",
                              "--folds", "3", "--out", str(out)]) == 0

    printed = capsys.readouterr().out
    assert "skipping 1 unreadable image file(s) of 31" in caplog.text  # logged, counted, left out
    assert "folder data of" in printed and "30 labelled images, 3 labels; 3 folds" in printed
    result = json.loads(out.read_text())
    assert len(result["folds"]) == 3
    # Colour gives the labels away: the anchor ranks (nearly) perfectly, and so does the head
    # whose sigmoid layer is set from a probe of the same frozen features.
    assert result["summary"]["probe"]["mAP"][0] > 0.9
    assert result["summary"]["bce"]["mAP"][0] > 0.9
    assert "30 photos (folder data of" in out.with_suffix(".md").read_text()

    # An interrupted run (here: cut back to its first fold) picks up after the folds it finished,
    # keeps them as they were, and its note does not pass the shorter clock off as the total.
    partial = tmp_path / "check.partial.json"
    saved = json.loads(partial.read_text())
    first_fold = saved["folds"][0]
    partial.write_text(json.dumps({"run": saved["run"], "folds": [first_fold]}))
    assert yardstick.main(["--config", str(config_path), "--config-data", "--heads", "bce",
                              "--folds", "3", "--out", str(out)]) == 0
    assert "resuming after 1 finished fold(s)" in capsys.readouterr().out
    resumed = json.loads(out.read_text())
    assert len(resumed["folds"]) == 3 and resumed["folds"][0] == first_fold
    assert resumed["resumed_after_folds"] == 1 and result["resumed_after_folds"] == 0
    assert "run now, resumed after 1 finished fold(s) of check.partial.json" in out.with_suffix(".md").read_text()
