"""A stand-in for the Kaggle client (test support; see ../../sitecustomize.py): "downloads" by copying
the folder TL_DIST_TEST_KAGGLE_SOURCE, after appending a line to TL_DIST_TEST_FAKE_KAGGLE and waiting a
second."""

import os
import shutil
import time
from pathlib import Path


class KaggleApi:
    def authenticate(self):
        pass

    def dataset_download_files(self, dataset, path, unzip=True, quiet=True):
        with open(os.environ["TL_DIST_TEST_FAKE_KAGGLE"], "a") as log:
            log.write(f"rank {os.environ.get('RANK')} pid {os.getpid()} {dataset}\n")
        time.sleep(1.0)
        # Kaggle's archive nests the class folders: caltech-101/caltech-101/<class>/...
        shutil.copytree(os.environ["TL_DIST_TEST_KAGGLE_SOURCE"], Path(path) / "caltech-101" / "caltech-101")
