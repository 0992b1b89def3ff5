"""A local stand-in for the Hugging Face Hub, for tests of the online path (Hub ids, Hub data at a revision, push,
reload by id@sha) with no network.

What it is: two processes on 127.0.0.1 that huggingface_hub, transformers and datasets reach through `HF_ENDPOINT`:

- **olah** (PyPI ``olah``, a self-hosted Hub mirror) in offline mode serves the git repositories under
  ``<root>/mirrors/{models,datasets,spaces}/<org>/<name>`` (bare repos, read per request): file downloads
  (``resolve``), repo info, ``tree``, ``paths-info``, ``commits`` and ``refs``.
- **a front server** (front.py, ``python3 tests/localhub serve``; stdlib ``http.server``), which is the endpoint
  the clients see. It forwards the reads to olah after doing what olah cannot:

  * revisions are resolved here, with ``git``, to a commit sha before olah sees them: branch and tag names,
    refs with slashes (``refs/convert/parquet``, ``refs/pr/66``) URL-encoded or not, short or full shas, in
    ``resolve``, ``api/.../revision``, ``tree``, ``paths-info``, ``commits``, ``preupload``, ``commit``;
  * ``model_info`` / ``dataset_info`` without a revision answer for ``main``, and report ``private`` from
    ``<repo>/localhub.json``;
  * errors carry the Hub's ``X-Error-Code``: a missing repo 401 ``RepoNotFound``, a missing revision 404
    ``RevisionNotFound``, a missing file or folder 404 ``EntryNotFound`` (olah answers 401 or 500), so that
    transformers' probing of optional files behaves as on the Hub;
  * ``Range`` requests on files are answered 206 with the requested bytes (olah sends the whole file);
  * olah's answers are fixed where clients trip on them: ``commits`` (authors as ``{"user": ...}``, title and
    message split), ``tree?expand=true`` (``lastCommit`` from the requested revision; olah fails off main);
  * writes, as huggingface_hub 2.x sends them: ``create_repo`` (``private``, 409 when it exists), ``delete_repo``,
    ``create_branch`` / ``delete_branch``, ``create_tag``, ``preupload`` (every file ``regular``, so contents come
    base64-encoded in the commit, never LFS or Xet), ``commit`` (``create_commit``, ``upload_file``,
    ``upload_folder``, deletions, ``parent_commit``, ``create_pr``): each commit is a real ``git commit`` on the
    named branch (or ``refs/pr/N``) of the server-side repository, answered with ``commitOid`` / ``commitUrl``;
  * pull requests and discussions, kept in ``localhub.json``: listing (transformers looks up the safetensors
    converter bot's PR there), details, creation (a new ``refs/pr/N`` from ``main``);
  * ``whoami-v2`` (user ``user``) and ``validate-yaml`` (YAML front matter parsed with PyYAML when present).

What it does not do: authentication and access control (no token is needed; ``private`` is recorded and reported,
not enforced, so a private repo pushed by a test can be read back without a token), git LFS and Xet uploads,
Spaces runtimes, the dataset viewer / datasets-server (``/parquet`` API), search and listing of repos, merging
PRs, comments, pagination (``tree`` comes in one page; ``commits`` lists the newest 50, olah's cap), repo ids
without a namespace (``gpt2``): ids are ``<org>/<name>``. The front server buffers whole files: fine for tiny repos.

Use::

    with LocalHub(tmp_path / "hub") as hub:
        build_clip_repo(hub); build_qwen_repo(hub); build_flickr30k_repo(hub, n_images=60)
        subprocess.run([sys.executable, "script.py"], env=hub.env(hf_home=tmp_path / "hf"))

``hub.env()`` is the environment a child process needs (``HF_ENDPOINT``, online mode, a fresh ``HF_HOME``, no
token); huggingface_hub reads ``HF_ENDPOINT`` at import, and the test suite's conftest sets offline mode, so the
online code runs in child processes. ``python3 tests/localhub up DIR`` builds the three repositories and serves
them until Ctrl-C (for poking with curl). Logs: ``<root>/logs/front.log`` (one line per request) and ``olah.out``.
"""

from .repos import (
    CLIP_ID,
    FLICKR_ID,
    QWEN_ID,
    build_all,
    build_clip_repo,
    build_flickr30k_repo,
    build_qwen_repo,
    flickr30k_rows,
    qwen_tokenizer_files,
)
from .server import LocalHub


__all__ = [
    "LocalHub",
    "CLIP_ID",
    "QWEN_ID",
    "FLICKR_ID",
    "build_clip_repo",
    "build_qwen_repo",
    "build_flickr30k_repo",
    "build_all",
    "flickr30k_rows",
    "qwen_tokenizer_files",
]
