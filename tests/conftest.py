import pytest


@pytest.fixture(scope="session")
def shapes_root(tmp_path_factory):
    """A small shapes-world dataset in its on-disk folder format (48 train, 16 val, 8 test)."""
    from orthodiff.data.shapes import write_dataset

    root = tmp_path_factory.mktemp("shapes")
    write_dataset(root, 48, n_val=16, n_test=8, progress=False)
    return root
