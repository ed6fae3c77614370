"""Hugging Face Hub download of exactly the files conversion needs, resumable, with clear auth errors."""

from hub.download import HubError, download, list_remote, select_files

__all__ = ["HubError", "download", "list_remote", "select_files"]
