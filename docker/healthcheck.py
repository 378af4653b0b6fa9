"""Container health check: exit 0 when the service's /readyz answers 200, else 1.

Uses only the standard library (the images carry no curl). The URL defaults to the port the
image's CMD serves on; OVD_HEALTHCHECK_URL overrides it.
"""

import os
import sys
import urllib.error
import urllib.request

URL = os.environ.get("OVD_HEALTHCHECK_URL", "http://127.0.0.1:8000/readyz")


def main() -> int:
    """Probe the readiness endpoint once; any error, timeout or non-200 status is unhealthy."""
    try:
        with urllib.request.urlopen(URL, timeout=4) as response:
            return 0 if response.status == 200 else 1
    except (urllib.error.URLError, OSError) as exc:
        sys.stderr.write(f"unhealthy: {URL}: {exc}\n")
        return 1


if __name__ == "__main__":
    sys.exit(main())
