"""`hybridnet-tf train` arguments for the tests' tiny demo runs, shared by the files that train through the CLI.

Each file keeps the sizes its checks need (the CLI's own test trains a little more; the NaN test
counts batches of 8) and passes them as arguments; what the runs share is spelled once here.
"""

# The joint fit's machinery alone (per-epoch checkpoints, continuing a run, the NaN stop): without
# the demo's warm start and frozen phase, which tests/test_warm_start.py covers.
JOINT_FIT_ONLY = ("train.warm_start_epochs=0", "train.frozen_epochs=0")


def tiny_demo_train(run_dir, demo_dir, *settings, train=64, val=16, batch_size=16, gru_units=16, embedding_dim=8):
    """`train` arguments for `configs/demo.yaml` on `train` + `val` scenes of 32 px with a small decoder.

    `settings` are further `--set` values (the phases, the epochs); they come last and so win.
    """
    sets = [
        f"data.demo_dir={demo_dir}",
        f"data.demo_train={train}",
        f"data.demo_val={val}",
        "data.demo_image_size=32",
        f"train.batch_size={batch_size}",
        f"model.gru_units={gru_units}",
        f"model.embedding_dim={embedding_dim}",
        *settings,
    ]
    return ["train", "--config", "configs/demo.yaml", "--run-dir", str(run_dir)] + [
        arg for value in sets for arg in ("--set", value)
    ]
