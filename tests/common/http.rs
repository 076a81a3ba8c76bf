//! A minimal blocking HTTP/1.1 client: enough to count every failure exactly,
//! and to tell "the server closed an idle keep-alive connection before our
//! request reached it" (retryable, as real clients do) from real failures.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

pub const IO_TIMEOUT: Duration = Duration::from_secs(20);

#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    /// The body as text (lossy).
    pub body: String,
    /// The body as it came.
    pub bytes: Vec<u8>,
    pub close: bool,
}

impl Response {
    /// The `pid=` in a `GET /` body.
    pub fn pid(&self) -> Option<u32> {
        self.body
            .split_whitespace()
            .find_map(|w| w.strip_prefix("pid="))
            .and_then(|p| p.parse().ok())
    }

    pub fn generation(&self) -> Option<u64> {
        self.body
            .split_whitespace()
            .find_map(|w| w.strip_prefix("generation="))
            .and_then(|g| g.parse().ok())
    }
}

/// Why a request failed, and whether any response byte had arrived.
#[derive(Debug)]
pub struct Failure {
    pub error: String,
    pub got_bytes: bool,
}

pub fn connect(addr: SocketAddr) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&addr, IO_TIMEOUT)?;
    stream.set_read_timeout(Some(IO_TIMEOUT))?;
    stream.set_write_timeout(Some(IO_TIMEOUT))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Sends one GET on `stream` and reads the response.
pub fn exchange(
    stream: &mut BufReader<TcpStream>,
    path: &str,
    keep_alive: bool,
) -> Result<Response, Failure> {
    exchange_request(stream, "GET", path, None, keep_alive)
}

/// Sends one request (with `body` and its `Content-Length`, if any) on
/// `stream` and reads the response.
pub fn exchange_request(
    stream: &mut BufReader<TcpStream>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
    keep_alive: bool,
) -> Result<Response, Failure> {
    let connection = if keep_alive { "keep-alive" } else { "close" };
    let mut request =
        format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: {connection}\r\n")
            .into_bytes();
    if let Some(body) = body {
        request.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
        request.extend_from_slice(body);
    } else {
        request.extend_from_slice(b"\r\n");
    }
    stream.get_mut().write_all(&request).map_err(|e| Failure {
        error: format!("write: {e}"),
        got_bytes: false,
    })?;
    read_response(stream)
}

fn read_response(stream: &mut BufReader<TcpStream>) -> Result<Response, Failure> {
    let fail = |error: String, got_bytes: bool| Failure { error, got_bytes };
    let mut status_line = String::new();
    match stream.read_line(&mut status_line) {
        Ok(0) => {
            return Err(fail(
                "connection closed before any response byte".into(),
                false,
            ))
        }
        Ok(_) => {}
        // A reset or timeout with nothing read: no response byte arrived.
        Err(e) => return Err(fail(format!("read status: {e}"), !status_line.is_empty())),
    }
    let status: u16 = status_line
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| fail(format!("bad status line {status_line:?}"), true))?;
    let mut length = None;
    let mut close = false;
    loop {
        let mut header = String::new();
        match stream.read_line(&mut header) {
            Ok(0) => return Err(fail("connection closed in the headers".into(), true)),
            Ok(_) => {}
            Err(e) => return Err(fail(format!("read headers: {e}"), true)),
        }
        let header = header.trim_end();
        if header.is_empty() {
            break;
        }
        if let Some((name, value)) = header.split_once(':') {
            let value = value.trim();
            match name.to_ascii_lowercase().as_str() {
                "content-length" => length = value.parse::<usize>().ok(),
                "connection" => close = value.eq_ignore_ascii_case("close"),
                _ => {}
            }
        }
    }
    let length = length.ok_or_else(|| fail("no content-length".into(), true))?;
    let mut body = vec![0; length];
    stream
        .read_exact(&mut body)
        .map_err(|e| fail(format!("read body: {e}"), true))?;
    Ok(Response {
        status,
        body: String::from_utf8_lossy(&body).into_owned(),
        bytes: body,
        close,
    })
}

/// One request on a new connection.
pub fn get(addr: SocketAddr, path: &str) -> Result<Response, String> {
    let stream = connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut stream = BufReader::new(stream);
    exchange(&mut stream, path, false).map_err(|f| f.error)
}

/// One POST with `body` on a new connection.
pub fn post(addr: SocketAddr, path: &str, body: &[u8]) -> Result<Response, String> {
    let stream = connect(addr).map_err(|e| format!("connect: {e}"))?;
    let mut stream = BufReader::new(stream);
    exchange_request(&mut stream, "POST", path, Some(body), false).map_err(|f| f.error)
}

/// A client that keeps its connection open between requests.
pub struct KeepAlive {
    addr: SocketAddr,
    stream: Option<BufReader<TcpStream>>,
    /// Requests retried because an idle connection was closed under us.
    pub retries: u64,
}

impl KeepAlive {
    pub fn new(addr: SocketAddr) -> Self {
        KeepAlive {
            addr,
            stream: None,
            retries: 0,
        }
    }

    /// GET on the kept connection. If a reused connection fails before any
    /// response byte arrived (the server closed it while idle), the request is
    /// retried once on a new connection, as HTTP clients do for idempotent
    /// requests. The retry itself must succeed.
    pub fn get(&mut self, path: &str) -> Result<Response, String> {
        self.request("GET", path, None)
    }

    /// POST on the kept connection. A POST is not idempotent: unlike
    /// [`get`](Self::get), it is never retried; a reused connection that
    /// fails before any response byte is an error.
    pub fn post(&mut self, path: &str, body: &[u8]) -> Result<Response, String> {
        self.request("POST", path, Some(body))
    }

    fn request(
        &mut self,
        method: &str,
        path: &str,
        body: Option<&[u8]>,
    ) -> Result<Response, String> {
        let idempotent = method == "GET";
        if let Some(stream) = self.stream.as_mut() {
            match exchange_request(stream, method, path, body, true) {
                Ok(response) => {
                    if response.close {
                        self.stream = None;
                    }
                    return Ok(response);
                }
                Err(failure) if !failure.got_bytes && idempotent => {
                    if std::env::var_os("HANDOFF_TEST_DEBUG").is_some() {
                        eprintln!("retry after: {}", failure.error);
                    }
                    self.retries += 1;
                    self.stream = None;
                }
                Err(failure) => {
                    self.stream = None;
                    return Err(format!(
                        "{method} on a reused connection: {}",
                        failure.error
                    ));
                }
            }
        }
        let stream = connect(self.addr).map_err(|e| format!("connect: {e}"))?;
        let mut stream = BufReader::new(stream);
        let response = exchange_request(&mut stream, method, path, body, true)
            .map_err(|f| format!("on a new connection: {}", f.error))?;
        if !response.close {
            self.stream = Some(stream);
        }
        Ok(response)
    }
}
