"""A stand-in for `kagglehub` (test support; see ../sitecustomize.py): "downloads" by copying the folder
TL_DIST_TEST_KAGGLE_SOURCE into `output_dir`, after appending a line to TL_DIST_TEST_FAKE_KAGGLE and
waiting a second. The real client is exercised by tests/test_download.py."""

import os
import shutil
import time
from pathlib import Path


def dataset_download(handle, path=None, *, force_download=False, output_dir=None):
    with open(os.environ["TL_DIST_TEST_FAKE_KAGGLE"], "a") as log:
        log.write(f"rank {os.environ.get('RANK')} pid {os.getpid()} {handle}\n")
    time.sleep(1.0)
    # Kaggle's archive nests the class folders: caltech-101/caltech-101/<class>/...
    shutil.copytree(os.environ["TL_DIST_TEST_KAGGLE_SOURCE"], Path(output_dir) / "caltech-101" / "caltech-101")
    return output_dir
