"""Dotted-path overrides of a ConfigDict, as `--config.a.b=v` does on the command line."""


def apply_overrides(config, overrides: dict):
  for key, value in overrides.items():
    node = config
    *path, last = key.split(".")
    for part in path:
      node = node[part]
    node[last] = value
  return config
