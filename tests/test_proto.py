"""Generated stubs are committed; they must match a fresh protoc run (`python -m kvpilot.protogen`)."""
from kvpilot.protogen import stale_files


def test_generated_stubs_are_up_to_date():
    stale = stale_files()
    assert not stale, f"stale generated stubs {stale}: run `make proto` (python -m kvpilot.protogen) and commit"
