//! A minimal Chrome DevTools Protocol client for the console's browser test: Debian's
//! `chromium` started headless with `--remote-debugging-port=0`, one page target, and a small
//! WebSocket client (RFC 6455: masked text frames out; text, continuation and close frames in)
//! over a blocking socket, so the test needs no browser-automation crate.

#![allow(dead_code)]

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

use crate::ops::Guarded;

/// Longest a DevTools call may take (a screenshot of a big page included).
pub const CALL_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest chromium may take to print its DevTools address.
pub const START_TIMEOUT: Duration = Duration::from_secs(60);
/// Largest WebSocket message accepted (a full-page PNG as base64).
pub const MESSAGE_BYTES_MAX: u64 = 64 << 20;

pub struct Browser {
    pub proc: Guarded,
    ws: TcpStream,
    next_id: u64,
    /// Every event received so far (console messages, exceptions, log entries).
    pub events: Vec<Value>,
}

impl Browser {
    /// Start headless chromium with a fresh profile in `profile` and attach to its page.
    pub fn start(chromium: &Path, profile: &Path, width: u32, height: u32) -> Browser {
        let mut cmd = Command::new(chromium);
        cmd.args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--no-first-run",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--hide-scrollbars",
            "--remote-debugging-port=0",
            "--remote-debugging-address=127.0.0.1",
            &format!("--window-size={width},{height}"),
            &format!("--user-data-dir={}", profile.display()),
            "about:blank",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
        let mut proc = Guarded::spawn("chromium", &mut cmd);
        let stderr = proc.child.stderr.take().expect("piped stderr");
        // The address line, read on a thread so a silent chromium cannot hang the test.
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let mut seen = String::new();
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(Ok(url.trim().to_string()));
                } else if seen.len() < 8192 {
                    seen.push_str(&line);
                    seen.push('\n');
                }
            }
            let _ = tx.send(Err(seen));
        });
        let browser_url = match rx.recv_timeout(START_TIMEOUT) {
            Ok(Ok(url)) => url,
            Ok(Err(out)) => panic!("chromium exited without a DevTools address:\n{out}"),
            Err(e) => panic!("chromium printed no DevTools address in {START_TIMEOUT:?}: {e}"),
        };
        let host = browser_url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .expect("host:port")
            .to_string();
        // The page target chromium opened on about:blank.
        let deadline = Instant::now() + START_TIMEOUT;
        let page_url = loop {
            if let Some(body) = json_list(&host) {
                let list: Value = serde_json::from_str(&body).unwrap_or(Value::Null);
                let page = list.as_array().and_then(|l| {
                    l.iter()
                        .find(|t| t["type"] == "page")
                        .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                        .map(str::to_string)
                });
                if let Some(p) = page {
                    break p;
                }
            }
            assert!(
                Instant::now() < deadline,
                "no page target in {host}/json/list"
            );
            std::thread::sleep(Duration::from_millis(200));
        };
        let ws = connect(&page_url);
        let mut b = Browser {
            proc,
            ws,
            next_id: 1,
            events: Vec::new(),
        };
        for domain in ["Page.enable", "Runtime.enable", "Log.enable"] {
            b.call(domain, json!({}));
        }
        b.call(
            "Emulation.setDeviceMetricsOverride",
            json!({"width": width, "height": height, "deviceScaleFactor": 1, "mobile": false}),
        );
        b
    }

    /// Call a DevTools method; its `result` (panics on a protocol error).
    pub fn call(&mut self, method: &str, params: Value) -> Value {
        let id = self.next_id;
        self.next_id += 1;
        let msg = json!({"id": id, "method": method, "params": params}).to_string();
        send_text(&mut self.ws, msg.as_bytes());
        loop {
            let text = recv_text(&mut self.ws);
            let v: Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("DevTools sent non-JSON ({e}): {text:.200}"));
            if v["id"] == id {
                if let Some(err) = v.get("error") {
                    panic!("{method}: {err}");
                }
                return v["result"].clone();
            }
            if v.get("method").is_some() {
                self.events.push(v);
            }
        }
    }

    /// Evaluate a JavaScript expression in the page (promises awaited); its value.
    pub fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true, "awaitPromise": true}),
        );
        if let Some(e) = r.get("exceptionDetails") {
            panic!("`{expression}` threw: {e}");
        }
        r["result"]["value"].clone()
    }

    /// Evaluate `expression` until `ok` holds of its value (the page polls its API every 2 s);
    /// the value. Panics after `wait`, with the last value.
    pub fn wait_for(
        &mut self,
        expression: &str,
        what: &str,
        wait: Duration,
        ok: impl Fn(&Value) -> bool,
    ) -> Value {
        let deadline = Instant::now() + wait;
        loop {
            let v = self.eval(expression);
            if ok(&v) {
                return v;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: `{expression}` is {v} after {wait:?}; console: {:?}",
                self.console_errors()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    pub fn navigate(&mut self, url: &str) {
        self.call("Page.navigate", json!({"url": url}));
    }

    /// A PNG of the viewport, written to `path`.
    pub fn screenshot(&mut self, path: &Path) {
        let r = self.call("Page.captureScreenshot", json!({"format": "png"}));
        let data = r["data"].as_str().expect("screenshot data");
        let png = base64_decode(data);
        assert!(png.starts_with(b"\x89PNG"), "not a PNG");
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).expect("artifact dir");
        }
        std::fs::write(path, png).expect("write screenshot");
    }

    /// Errors the page logged: console.error calls, uncaught exceptions, failed loads.
    pub fn console_errors(&self) -> Vec<String> {
        self.events
            .iter()
            .filter_map(|e| match e["method"].as_str()? {
                "Runtime.consoleAPICalled" if e["params"]["type"] == "error" => {
                    Some(format!("console.error: {}", e["params"]["args"]))
                }
                "Runtime.exceptionThrown" => {
                    Some(format!("exception: {}", e["params"]["exceptionDetails"]))
                }
                "Log.entryAdded" if e["params"]["entry"]["level"] == "error" => {
                    Some(format!("log: {}", e["params"]["entry"]))
                }
                _ => None,
            })
            .collect()
    }
}

/// `GET /json/list` of chromium's DevTools HTTP server, which keeps the connection open after
/// its answer: the head, then exactly Content-Length bytes.
fn json_list(host: &str) -> Option<String> {
    let mut s = TcpStream::connect(host).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(s, "GET /json/list HTTP/1.1\r\nHost: {host}\r\n\r\n").ok()?;
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") && head.len() < 8192 {
        s.read_exact(&mut byte).ok()?;
        head.push(byte[0]);
    }
    let head = String::from_utf8_lossy(&head).to_ascii_lowercase();
    if !head.starts_with("http/1.1 200") {
        return None;
    }
    let len: usize = head
        .lines()
        .find_map(|l| l.strip_prefix("content-length:"))?
        .trim()
        .parse()
        .ok()?;
    let mut body = vec![0u8; len.min(1 << 20)];
    s.read_exact(&mut body).ok()?;
    String::from_utf8(body).ok()
}

fn connect(url: &str) -> TcpStream {
    let rest = url.trim_start_matches("ws://");
    let (host, path) = rest.split_at(rest.find('/').expect("ws path"));
    let mut s = TcpStream::connect(host).unwrap_or_else(|e| panic!("connect {host}: {e}"));
    s.set_read_timeout(Some(CALL_TIMEOUT)).expect("timeout");
    s.set_nodelay(true).expect("nodelay");
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
    );
    s.write_all(req.as_bytes()).expect("upgrade request");
    let mut head = Vec::new();
    let mut byte = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        s.read_exact(&mut byte).expect("upgrade response");
        head.push(byte[0]);
        assert!(head.len() < 8192, "upgrade response too long");
    }
    let head = String::from_utf8_lossy(&head);
    assert!(head.starts_with("HTTP/1.1 101"), "no upgrade: {head}");
    s
}

fn send_text(s: &mut TcpStream, payload: &[u8]) {
    let mask = [0x5a, 0x13, 0xc7, 0x2e];
    let mut frame = vec![0x81u8];
    let n = payload.len();
    if n < 126 {
        frame.push(0x80 | u8::try_from(n).expect("< 126"));
    } else if let Ok(n16) = u16::try_from(n) {
        frame.push(0x80 | 126);
        frame.extend_from_slice(&n16.to_be_bytes());
    } else {
        frame.push(0x80 | 127);
        frame.extend_from_slice(&(n as u64).to_be_bytes());
    }
    frame.extend_from_slice(&mask);
    frame.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    s.write_all(&frame).expect("send frame");
}

fn recv_text(s: &mut TcpStream) -> String {
    let mut message = Vec::new();
    loop {
        let mut h = [0u8; 2];
        s.read_exact(&mut h)
            .expect("frame header (DevTools call timed out?)");
        let (fin, opcode) = (h[0] & 0x80 != 0, h[0] & 0x0f);
        let mut len = u64::from(h[1] & 0x7f);
        if len == 126 {
            let mut b = [0u8; 2];
            s.read_exact(&mut b).expect("len16");
            len = u64::from(u16::from_be_bytes(b));
        } else if len == 127 {
            let mut b = [0u8; 8];
            s.read_exact(&mut b).expect("len64");
            len = u64::from_be_bytes(b);
        }
        assert!(len <= MESSAGE_BYTES_MAX, "DevTools frame of {len} bytes");
        let mut mask = [0u8; 4];
        let masked = h[1] & 0x80 != 0;
        if masked {
            s.read_exact(&mut mask).expect("mask");
        }
        let mut payload = vec![0u8; usize::try_from(len).expect("fits")];
        s.read_exact(&mut payload).expect("payload");
        if masked {
            for (i, b) in payload.iter_mut().enumerate() {
                *b ^= mask[i % 4];
            }
        }
        match opcode {
            0x8 => panic!("DevTools closed the connection"),
            0x9 | 0xa => continue,
            _ => message.extend_from_slice(&payload),
        }
        if fin {
            return String::from_utf8(message).expect("utf-8 text frame");
        }
    }
}

fn base64_decode(s: &str) -> Vec<u8> {
    let val = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {c}"),
        }
    };
    let bytes: Vec<u8> = s.bytes().filter(|&c| c != b'=').collect();
    let mut out = Vec::with_capacity(bytes.len() * 3 / 4);
    for chunk in bytes.chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= val(c) << (18 - 6 * i);
        }
        let [_, a, b, c] = acc.to_be_bytes();
        out.push(a);
        if chunk.len() > 2 {
            out.push(b);
        }
        if chunk.len() > 3 {
            out.push(c);
        }
    }
    out
}

#[test]
fn base64_decodes_what_chromium_sends() {
    assert_eq!(base64_decode("aGVsbG8="), b"hello");
    assert_eq!(base64_decode("aGk="), b"hi");
    assert_eq!(base64_decode("YWJj"), b"abc");
}
