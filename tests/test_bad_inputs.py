"""The check that a dataset's download host answers, made before TFDS's download (which
retries for minutes without a network); the command line's bad inputs are in test_main.py."""
import functools
import http.server
import threading

from dfnas_jax.data import input_pipeline as ip


class _Builder:
  """What the check reads of a TFDS builder: the URLs its download fetches."""

  def __init__(self, url):
    self.url_infos = {url: None}


class _QuietHandler(http.server.SimpleHTTPRequestHandler):

  def log_message(self, *args):
    pass


def test_a_host_that_answers_passes_and_one_that_does_not_is_named(tmp_path, monkeypatch):
  for name in ('http_proxy', 'all_proxy', 'HTTP_PROXY', 'ALL_PROXY'):
    monkeypatch.delenv(name, raising=False)
  handler = functools.partial(_QuietHandler, directory=str(tmp_path))
  server = http.server.HTTPServer(('127.0.0.1', 0), handler)
  threading.Thread(target=server.serve_forever, daemon=True).start()
  url = f'http://127.0.0.1:{server.server_port}/cifar-10-binary.tar.gz'
  try:
    assert ip._unreachable(_Builder(url)) is None  # answered (404 here): TFDS downloads
  finally:
    server.shutdown()
    server.server_close()
  why = ip._unreachable(_Builder(url))  # the port is closed now
  assert why.startswith(f'cannot reach {url} (') and 'refused' in why, why
  assert ip._unreachable(_Builder('gs://bucket/file')) is None  # not HTTP: TFDS copies it
