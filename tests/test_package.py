"""The wheel a user installs carries the config groups and all three packages."""
import subprocess
import sys
import zipfile

from conftest import ROOT


def test_wheel_ships_configs(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q",
                    "-w", str(tmp_path), str(ROOT)], check=True, capture_output=True)
    (wheel,) = tmp_path.glob("compress-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    for expected in ("compress/configs/config.yaml", "compress/configs/teacher/llama7b.yaml",
                     "compress/configs/data/rotten_tomatoes.yaml", "compress/configs/pipeline/evaluate.yaml",
                     "teachers/loading.py", "students/build.py", "compress/cli.py"):
        assert expected in names, expected
    entry = [n for n in names if n.endswith("entry_points.txt")]
    text = zipfile.ZipFile(wheel).read(entry[0]).decode()
    assert "compress = compress.cli:main" in text
