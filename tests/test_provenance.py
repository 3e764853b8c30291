"""difftrack.provenance and difftrack.paths: where a measurement came from and where files go."""
import subprocess

from difftrack import paths, provenance


def test_git_commit_prefers_the_environment(monkeypatch):
    monkeypatch.setenv("GIT_COMMIT", "0123456789abcdef0123456789abcdef01234567")
    assert provenance.git_commit() == "0123456789abcdef0123456789abcdef01234567"
    assert provenance.git_commit(short=True) == "0123456"


def test_git_commit_reads_the_repository_and_marks_edits(monkeypatch, tmp_path):
    """Outside the environment variable: HEAD of the repository, ``-dirty`` when tracked code differs from it, and
    ``"unknown"`` where there is no repository."""
    monkeypatch.delenv("GIT_COMMIT", raising=False)
    run = lambda *a: subprocess.run(["git", *a], cwd=tmp_path, check=True, capture_output=True)  # noqa: E731
    run("init", "-q")
    (tmp_path / "difftrack").mkdir()
    (tmp_path / "difftrack" / "m.py").write_text("x = 1\n")
    run("add", ".")
    run("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "c")
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=tmp_path, capture_output=True, text=True).stdout.strip()
    assert provenance.git_commit(root=tmp_path) == head
    (tmp_path / "difftrack" / "m.py").write_text("x = 2\n")
    assert provenance.git_commit(root=tmp_path) == head + "-dirty"
    assert provenance.git_commit(short=True, root=tmp_path) == head[:7] + "-dirty"
    assert provenance.git_commit(root=tmp_path / "difftrack" / "nowhere") == "unknown"


def test_device_name_on_the_cpu_names_the_cores():
    assert "core" in provenance.device_name("cpu")


def test_paths_follow_difftrack_root(monkeypatch, tmp_path):
    monkeypatch.setenv("DIFFTRACK_ROOT", str(tmp_path))
    assert paths.repo_root() == tmp_path
    assert paths.figures_dir() == tmp_path / "figures" and (tmp_path / "figures").is_dir()
    assert paths.cache_dir("analysis") == tmp_path / "cache" / "analysis" and (tmp_path / "cache" / "analysis").is_dir()


def test_paths_find_the_checkout_from_a_subfolder(monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFTRACK_ROOT", raising=False)
    (tmp_path / "pyproject.toml").write_text("")
    (tmp_path / "difftrack").mkdir()
    (tmp_path / "notebooks").mkdir()
    monkeypatch.chdir(tmp_path / "notebooks")
    assert paths.repo_root() == tmp_path.resolve()
    assert paths.results_dir() == tmp_path.resolve() / "results"
