"""Kernel backends: each declares what it supports and explains what it refuses."""
