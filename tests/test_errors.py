"""The exception tree and its status table."""

from __future__ import annotations

import inspect

import grpc

from featmap.contract import errors


def error_classes() -> list[type[errors.FeatmapError]]:
    return [
        cls
        for _, cls in inspect.getmembers(errors, inspect.isclass)
        if issubclass(cls, errors.FeatmapError)
    ]


def test_every_error_class_is_in_the_table() -> None:
    assert set(error_classes()) == set(errors.STATUS_CODES)


def test_every_error_class_is_documented_in_the_tree() -> None:
    assert errors.__doc__ is not None
    for cls in error_classes():
        assert cls.__name__ in errors.__doc__
        assert cls.__doc__ and "\n" not in cls.__doc__.strip()


def test_status_codes() -> None:
    assert errors.InvalidSpec("f", "m").status_code == grpc.StatusCode.INVALID_ARGUMENT
    assert errors.LimitExceeded("f", "m").status_code == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert errors.ExecutionFailed("f", "m").status_code == grpc.StatusCode.INTERNAL
    assert errors.status_for(KeyError("x")) == grpc.StatusCode.INTERNAL


def test_message_starts_with_the_field() -> None:
    error = errors.InvalidTensor("images.shape", "has rank 3")
    assert str(error) == "images.shape: has rank 3"
    assert error.field == "images.shape"
