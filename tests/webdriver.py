"""A small W3C WebDriver client over urllib (for chromedriver + headless chromium)."""

import base64
import json
import time
import urllib.error
import urllib.request

ELEMENT = "element-6066-11e4-a52e-4f735466cecf"
CHROME_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
    "--disable-dev-shm-usage",
    "--window-size=1280,900",
]


class WebDriverError(Exception):
    pass


def _call(method, url, body=None, timeout=60):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return json.loads(r.read() or b"null").get("value")
    except urllib.error.HTTPError as e:
        value = json.loads(e.read() or b"{}").get("value", {})
        raise WebDriverError(f"{value.get('error')}: {value.get('message', '')[:500]}") from None


class Element:
    def __init__(self, session, eid):
        self.session, self.id = session, eid

    def _url(self, suffix=""):
        return f"{self.session.url}/element/{self.id}{suffix}"

    @property
    def text(self):
        return _call("GET", self._url("/text"))

    def click(self):
        _call("POST", self._url("/click"), {})
        return self

    def send_keys(self, text):
        _call("POST", self._url("/value"), {"text": text})
        return self

    def clear(self):
        _call("POST", self._url("/clear"), {})
        return self

    def prop(self, name):
        return _call("GET", self._url(f"/property/{name}"))

    def find(self, css):
        return Element(
            self.session, _call("POST", self._url("/element"), {"using": "css selector", "value": css})[ELEMENT]
        )

    def find_all(self, css):
        return [
            Element(self.session, e[ELEMENT])
            for e in _call("POST", self._url("/elements"), {"using": "css selector", "value": css})
        ]


class Browser:
    def __init__(self, driver_url, binary="/usr/bin/chromium", user_data_dir=None):
        args = CHROME_ARGS + ([f"--user-data-dir={user_data_dir}"] if user_data_dir else [])
        caps = {
            "capabilities": {
                "alwaysMatch": {
                    "browserName": "chrome",
                    "goog:chromeOptions": {"binary": binary, "args": args},
                    "goog:loggingPrefs": {"browser": "ALL"},
                }
            }
        }
        value = _call("POST", f"{driver_url}/session", caps, timeout=120)
        self.url = f"{driver_url}/session/{value['sessionId']}"

    def get(self, url):
        _call("POST", f"{self.url}/url", {"url": url})

    def refresh(self):
        _call("POST", f"{self.url}/refresh", {})

    @property
    def current_url(self):
        return _call("GET", f"{self.url}/url")

    def find_all(self, css):
        return [
            Element(self, e[ELEMENT])
            for e in _call("POST", f"{self.url}/elements", {"using": "css selector", "value": css})
        ]

    def find_xpath(self, xpath):
        return [
            Element(self, e[ELEMENT]) for e in _call("POST", f"{self.url}/elements", {"using": "xpath", "value": xpath})
        ]

    def execute(self, script, *args):
        return _call("POST", f"{self.url}/execute/sync", {"script": script, "args": list(args)})

    def execute_async(self, script, *args):
        return _call("POST", f"{self.url}/execute/async", {"script": script, "args": list(args)})

    def console_errors(self):
        """The browser console's errors since the last call (chromedriver's log endpoint drains them)."""
        entries = _call("POST", f"{self.url}/se/log", {"type": "browser"}) or []
        return [e["message"] for e in entries if e.get("level") == "SEVERE"]

    def set_window_size(self, width, height):
        _call("POST", f"{self.url}/window/rect", {"width": width, "height": height})

    def screenshot(self, path):
        with open(path, "wb") as f:
            f.write(base64.b64decode(_call("GET", f"{self.url}/screenshot")))

    def quit(self):
        try:
            _call("DELETE", self.url, timeout=20)
        except Exception:  # noqa: BLE001 - the browser may be gone already
            pass

    def wait(self, condition, timeout=10, message="condition"):
        """Call condition() until it returns something truthy; return that."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            try:
                result = condition()
                if result:
                    return result
            except WebDriverError as e:  # e.g. a stale element while the page re-renders
                last_error = e
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {message}"
                    + (f" (last error: {last_error})" if last_error else "")
                )
            time.sleep(0.1)
