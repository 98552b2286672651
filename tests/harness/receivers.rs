//! Tiny real receivers for the relay's alerts: an HTTP server that takes
//! webhook POSTs and an SMTP server that takes mail, both on 127.0.0.1 with a
//! port the OS picks. They speak just enough of each protocol for one client
//! (reqwest, lettre) and hand what they received to the test through a
//! channel. Each keeps accepting connections until the test ends, so one
//! receiver can take several alerts.

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// Starts an HTTP receiver. Returns its URL (`http://127.0.0.1:PORT/hook`)
/// and a channel that yields each request body, parsed as JSON (a body that
/// is not JSON arrives as a JSON string, so a test fails on its assertion
/// and shows what came).
pub async fn http_receiver() -> (String, mpsc::UnboundedReceiver<serde_json::Value>) {
    let (listener, port) = bind().await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                if let Ok(body) = read_http_request(stream).await {
                    let value = serde_json::from_slice(&body).unwrap_or_else(|_| {
                        serde_json::Value::String(String::from_utf8_lossy(&body).into_owned())
                    });
                    let _ = tx.send(value);
                }
            });
        }
    });
    (format!("http://127.0.0.1:{port}/hook"), rx)
}

/// Starts an HTTP receiver that reads each request and never answers (a
/// hung webhook). Returns its URL and a channel that yields `()` per request.
pub async fn hung_http_receiver() -> (String, mpsc::UnboundedReceiver<()>) {
    let (listener, port) = bind().await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((stream, _)) = listener.accept().await {
            let _ = tx.send(());
            // Kept open and silent until the test ends.
            held.push(stream);
        }
    });
    (format!("http://127.0.0.1:{port}/hook"), rx)
}

/// Reads one request, answers `200 OK` and closes (so no keep-alive to
/// handle), and returns the body.
async fn read_http_request(stream: TcpStream) -> std::io::Result<Vec<u8>> {
    let mut stream = BufReader::new(stream);
    let mut content_length = 0;
    loop {
        let mut line = String::new();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        if let Some((name, value)) = line.split_once(':')
            && name.eq_ignore_ascii_case("content-length")
        {
            content_length = value.trim().parse().unwrap_or(0);
        }
    }
    let mut body = vec![0; content_length];
    stream.read_exact(&mut body).await?;
    stream
        .write_all(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\nconnection: close\r\n\r\n")
        .await?;
    stream.shutdown().await?;
    Ok(body)
}

/// Starts a plain-text SMTP receiver (no TLS, no AUTH). Returns its URL
/// (`smtp://127.0.0.1:PORT`, which lettre takes as "no TLS") and a channel
/// that yields the raw data of each message: headers and body as sent
/// after DATA, without the terminating dot.
pub async fn smtp_receiver() -> (String, mpsc::UnboundedReceiver<String>) {
    let (listener, port) = bind().await;
    let (tx, rx) = mpsc::unbounded_channel();
    tokio::spawn(async move {
        while let Ok((stream, _)) = listener.accept().await {
            let tx = tx.clone();
            tokio::spawn(async move {
                let _ = smtp_session(stream, &tx).await;
            });
        }
    });
    (format!("smtp://127.0.0.1:{port}"), rx)
}

/// Serves one SMTP session; a session may carry several messages.
async fn smtp_session(
    stream: TcpStream,
    tx: &mpsc::UnboundedSender<String>,
) -> std::io::Result<()> {
    let mut stream = BufReader::new(stream);
    stream
        .write_all(b"220 127.0.0.1 ESMTP test receiver\r\n")
        .await?;
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Ok(());
        }
        let verb = line.get(..4).unwrap_or_default().to_ascii_uppercase();
        let reply: &[u8] = match verb.as_str() {
            "EHLO" | "HELO" => b"250 127.0.0.1\r\n",
            "MAIL" | "RCPT" | "RSET" | "NOOP" => b"250 OK\r\n",
            "DATA" => {
                stream.write_all(b"354 end with <CRLF>.<CRLF>\r\n").await?;
                let _ = tx.send(read_smtp_data(&mut stream).await?);
                b"250 OK queued\r\n"
            }
            "QUIT" => {
                stream.write_all(b"221 bye\r\n").await?;
                return Ok(());
            }
            _ => b"502 command not implemented\r\n",
        };
        stream.write_all(reply).await?;
    }
}

/// Reads message data up to the lone "." line, undoing dot-stuffing.
async fn read_smtp_data(stream: &mut BufReader<TcpStream>) -> std::io::Result<String> {
    let mut data = String::new();
    let mut line = String::new();
    loop {
        line.clear();
        if stream.read_line(&mut line).await? == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        if line == ".\r\n" || line == ".\n" {
            return Ok(data);
        }
        data.push_str(line.strip_prefix('.').unwrap_or(&line));
    }
}

async fn bind() -> (TcpListener, u16) {
    let listener = TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind a receiver on 127.0.0.1");
    let port = listener.local_addr().expect("receiver address").port();
    (listener, port)
}
