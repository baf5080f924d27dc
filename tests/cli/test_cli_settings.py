"""List settings read the way shell users write them; bad values become one line naming the variable."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError
from pydantic_settings import SettingsError

from worker.cli.common import settings_error_message
from worker.settings import Settings


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("cdn.example.com", ["cdn.example.com"]),
        ("a.example.com, b.example.com,", ["a.example.com", "b.example.com"]),
        ('["x.example.com", "y.example.com"]', ["x.example.com", "y.example.com"]),
    ],
)
def test_list_settings_take_plain_comma_separated_or_json(
    monkeypatch: pytest.MonkeyPatch, value: str, expected: list[str]
) -> None:
    monkeypatch.setenv("MODERATION_HTTPS_ALLOW_HOSTS", value)
    assert Settings().https_allow_hosts == expected


def test_a_dotenv_file_takes_comma_lists_too(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MODERATION_ALLOWED_FORMATS", raising=False)
    (tmp_path / ".env").write_text("MODERATION_ALLOWED_FORMATS=JPEG,PNG\n")
    assert Settings().allowed_formats == ["JPEG", "PNG"]


def test_errors_name_the_variable_its_value_and_the_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODERATION_MAX_BATCH", "abc")
    with pytest.raises(ValidationError) as caught:
        Settings()
    message = settings_error_message(caught.value)
    assert message.startswith("MODERATION_MAX_BATCH='abc': ")
    assert message.endswith("fix: set MODERATION_MAX_BATCH to a valid value or unset it (default: 64)")
    monkeypatch.delenv("MODERATION_MAX_BATCH")
    monkeypatch.setenv("MODERATION_REVIEW_USERS", "{not json")
    with pytest.raises(SettingsError) as parse:
        Settings()
    assert settings_error_message(parse.value).startswith("MODERATION_REVIEW_USERS could not be parsed")
    monkeypatch.delenv("MODERATION_REVIEW_USERS")
    monkeypatch.setenv("MODERATION_WORKER_PROCESSES", "0")
    with pytest.raises(ValidationError) as alias:
        Settings()
    assert settings_error_message(alias.value).startswith("MODERATION_WORKER_PROCESSES='0': ")
