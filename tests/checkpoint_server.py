"""A loopback HTTP server for checkpoints: what the tests that load by URL download from."""
import http.server
import io
import threading

import torch


class CheckpointServer:
    """Serves bytes by path on 127.0.0.1 and records every request's path."""

    def __init__(self):
        self.files, self.requests = {}, []
        server = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                server.requests.append(self.path)
                data = server.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                self.send_response(200)
                self.send_header('Content-Length', str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(('127.0.0.1', 0), Handler)
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, name):
        return f'http://127.0.0.1:{self.httpd.server_address[1]}/{name}'

    def serve(self, name, checkpoint):
        """Serve ``checkpoint`` (saved with ``torch.save``) as ``name``; returns its URL."""
        buffer = io.BytesIO()
        torch.save(checkpoint, buffer)
        self.files[f'/{name}'] = buffer.getvalue()
        return self.url(name)

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()
        self.thread.join()
