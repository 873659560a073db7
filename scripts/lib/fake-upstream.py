"""The demo's fake upstream: an HTTPS API that wants a bearer token.

Run inside the demo's own network namespace by scripts/demo:
    python3 fake-upstream.py ADDR PORT CERT KEY TOKEN_FILE
GET /auth answers 200 only with `Authorization: Bearer <token>`.
"""
import http.server
import ssl
import sys

addr, port, cert, key, token_file = sys.argv[1:6]
with open(token_file) as f:
    token = f.read().strip()


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        if self.path == "/auth" and self.headers.get("Authorization") == f"Bearer {token}":
            body, code = b"authorized: hello from the fake upstream\n", 200
        elif self.path == "/auth":
            body, code = b"unauthorized\n", 401
        else:
            body, code = b"not found\n", 404
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, fmt, *args):
        sys.stderr.write("fake upstream: " + (fmt % args) + "\n")


server = http.server.HTTPServer((addr, int(port)), Handler)
ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
ctx.load_cert_chain(cert, key)
server.socket = ctx.wrap_socket(server.socket, server_side=True)
server.serve_forever()
