"""Security tests: the access matrix, hostile uploads, template injection, SSRF, secrets."""
