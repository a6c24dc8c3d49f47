"""Offline stand-in for @rules_proto//proto:defs.bzl: thin wrappers over Bazel's native rules."""

def proto_lang_toolchain(**attrs):
    native.proto_lang_toolchain(**attrs)

def proto_library(**attrs):
    native.proto_library(**attrs)
