"""Files users and CI rely on stay consistent."""

from launching import REPO


def test_ci_runs_the_readme_test_command_verbatim():
    command = (REPO / ".ci" / "run").read_text().strip().splitlines()[-1]
    assert "pytest" in command and "torch==2.13.0" in command
    assert command in (REPO / "README.md").read_text()


def test_pyproject_keeps_a_torch_range_not_a_pin():
    text = (REPO / "pyproject.toml").read_text()
    assert '"torch>=2.9"' in text and "torch==" not in text


def test_the_readme_is_a_front_page_whose_links_exist():
    import re

    text = (REPO / "README.md").read_text()
    assert len(text.splitlines()) <= 250
    links = re.findall(r"\]\(([^)#]+\.md)(?:#[^)]*)?\)", text)
    assert links, "the README links the manual"
    for link in links:
        assert (REPO / link).is_file(), link


def test_every_manual_page_is_in_the_docs_navigation():
    nav = (REPO / "mkdocs.yml").read_text()
    for page in sorted((REPO / "docs").glob("*.md")):
        assert f": {page.name}" in nav, page.name


def test_test_modules_have_unique_names():
    """pytest imports test modules by their basename (no __init__.py): two alike stop the collection."""
    names = [p.name for p in (REPO / "tests").rglob("test_*.py")]
    assert len(names) == len(set(names)), sorted(n for n in names if names.count(n) > 1)
