//! A tiny HTTP server on 127.0.0.1 for the download tests (`kimg fetch`, the
//! Kubernetes release download): it serves a folder, honours `Range: bytes=N-`, and
//! can drop the first request of some files halfway, like a lost connection.

use std::fs;
use std::io::{self, BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// What the server saw: one `Range` header value (or "") per request of the files
/// whose first request is cut.
pub type Seen = Arc<Mutex<Vec<String>>>;

/// Serves `dir` at the returned `http://127.0.0.1:PORT`; a missing file is a 404. The
/// first request of a file whose path ends with `cut_first` sends half of its body
/// and hangs up.
pub fn serve(dir: PathBuf, cut_first: Option<&'static str>) -> (String, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let seen: Seen = Arc::default();
    let seen2 = seen.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let _ = handle(stream, &dir, cut_first, &seen2);
        }
    });
    (base, seen)
}

fn handle(
    mut stream: TcpStream,
    dir: &Path,
    cut_first: Option<&str>,
    seen: &Seen,
) -> io::Result<()> {
    let mut r = BufReader::new(stream.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let path = line.split_whitespace().nth(1).unwrap_or("/").to_string();
    let mut range = None;
    loop {
        let mut h = String::new();
        r.read_line(&mut h)?;
        if h.trim().is_empty() {
            break;
        }
        if let Some(v) = h.to_ascii_lowercase().strip_prefix("range:") {
            range = Some(v.trim().to_string());
        }
    }
    let Ok(body) = fs::read(dir.join(path.trim_start_matches('/'))) else {
        return stream.write_all(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n");
    };
    let start = range
        .as_deref()
        .and_then(|v| v.strip_prefix("bytes="))
        .and_then(|v| v.strip_suffix('-'))
        .and_then(|v| v.parse::<usize>().ok());
    let first_cut_request = if cut_first.is_some_and(|suffix| path.ends_with(suffix)) {
        let mut s = seen.lock().unwrap();
        s.push(range.clone().unwrap_or_default());
        s.len() == 1
    } else {
        false
    };
    let (head, part) = match start {
        Some(s) if s < body.len() => (
            format!(
                "HTTP/1.1 206 Partial Content\r\nContent-Length: {}\r\nContent-Range: bytes {s}-{}/{}\r\n",
                body.len() - s,
                body.len() - 1,
                body.len()
            ),
            &body[s..],
        ),
        _ => (
            format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\n", body.len()),
            &body[..],
        ),
    };
    stream.write_all(head.as_bytes())?;
    stream.write_all(b"Connection: close\r\n\r\n")?;
    if first_cut_request {
        stream.write_all(&part[..part.len() / 2])?;
        return stream.shutdown(std::net::Shutdown::Both);
    }
    stream.write_all(part)
}
