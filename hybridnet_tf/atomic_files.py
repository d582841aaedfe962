"""Writing files so that a kill never leaves half of one: temp file + rename."""

import json
import os
import tempfile


def default_permissions(path):
    """Gives a temp file / folder the mode a plain open() / makedirs() would have.

    mkstemp and mkdtemp create owner-only files, which a server running as
    another user (e.g. TF Serving in Docker) could not read.
    """
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(path, (0o777 if os.path.isdir(path) else 0o666) & ~umask)


def write_json_atomically(path, content, indent=1):
    """Writes `content` as JSON through a temporary file in the same folder and `os.replace`.

    NaN and infinity are refused (they are not JSON). Returns `path`.
    """
    path = os.fspath(path)
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    # Same folder, so os.replace is an atomic rename.
    handle, temp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as file:
            json.dump(content, file, indent=indent, allow_nan=False)
            file.write("\n")
        default_permissions(temp_path)
        os.replace(temp_path, path)
    except BaseException:
        if os.path.exists(temp_path):
            os.remove(temp_path)
        raise
    return path
