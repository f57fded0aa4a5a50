"""``python -m tools.phantom write_dataset ...`` / ``python -m tools.phantom preview ...`` (see ``dataset.main``)."""

from tools.phantom.dataset import main

if __name__ == "__main__":
    main()
