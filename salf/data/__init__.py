"""The data: local files and built-in corpora -> tokenized ``TaskData`` in the shared datum format."""
