"""What `pip install .` puts in site-packages: the project's two import names and nothing generic beside them."""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# What a checkout holds that no build reads (and a build left in the tree could leak old files into the wheel).
NOT_SOURCE = shutil.ignore_patterns(".git", ".venv", "runs", "work", "build", "dist", "*.egg-info", "__pycache__")


def test_the_wheel_installs_only_modeling_awd_lstm_and_ulmfit(tmp_path):
    source = tmp_path / "source"
    shutil.copytree(ROOT, source, ignore=NOT_SOURCE)
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "--wheel-dir", str(tmp_path), str(source)],
        check=True,
    )
    wheel = zipfile.ZipFile(next(tmp_path.glob("ulmfit_hf-*.whl")))
    files = wheel.namelist()

    top_level = {name.split("/")[0] for name in files if not name.split("/")[0].endswith(".dist-info")}
    assert top_level == {"modeling_awd_lstm", "ulmfit"}
    # The folders of the layout arrive under `ulmfit`: recipes, bundled data, metrics and the shipped model.
    for name in ("ulmfit/cli.py", "ulmfit/data/sources.py", "ulmfit/hub_configs/demo.yaml",
                 "ulmfit/demo_data/imdb_train.jsonl.gz", "ulmfit/metrics/accuracy/accuracy.py",
                 "ulmfit/pretrained/en/model.safetensors", "modeling_awd_lstm/kernels_awd_lstm.py"):
        assert name in files, name
    entry_points = next(name for name in files if name.endswith(".dist-info/entry_points.txt"))
    assert "ulmfit = ulmfit.cli:main" in wheel.read(entry_points).decode()
