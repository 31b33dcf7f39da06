//! Lets Workload API clients that send the socket's path as the HTTP/2 `:authority` in.
//!
//! grpcio (Python, so py-spiffe) since 1.57, grpc-java's Netty transport and grpc-swift send the
//! %-encoded socket path as the `:authority` of a `unix:` target. That is not a valid authority,
//! and h2 (tonic's HTTP/2) resets such a stream with PROTOCOL_ERROR before any service sees it
//! (hyperium/h2 pull request 487, open). go-spiffe (grpc-go) sends `localhost`.
//!
//! [`wrap`] sits between the accepted Unix stream and tonic: frames from the client pass
//! through unchanged, except header blocks (HEADERS + CONTINUATION), which are decoded with
//! the client's HPACK state, get `localhost` for an `:authority` that is not a valid authority,
//! and are re-encoded with our own HPACK state toward h2. The peer's credentials
//! (`SO_PEERCRED`, for `--workload-api-uid`) are those of the real socket.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, DuplexStream, ReadBuf};
use tokio::net::UnixStream;
use tonic::transport::server::{Connected, UdsConnectInfo};

/// The client connection preface (RFC 9113, 3.4).
const PREFACE: &[u8; 24] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
/// The largest frame the client may send: h2's default SETTINGS_MAX_FRAME_SIZE.
const MAX_FRAME: usize = 16_384;
/// The largest header block accepted (HEADERS plus CONTINUATIONs).
const MAX_BLOCK: usize = 64 * 1024;
const HEADERS: u8 = 0x1;
const CONTINUATION: u8 = 0x9;
const END_STREAM: u8 = 0x1;
const END_HEADERS: u8 = 0x4;
const PADDED: u8 = 0x8;
const PRIORITY: u8 = 0x20;

/// A client connection as tonic sees it: the rewritten byte stream, the real peer's identity.
pub struct Rewritten {
    io: DuplexStream,
    info: UdsConnectInfo,
}

impl Connected for Rewritten {
    type ConnectInfo = UdsConnectInfo;
    fn connect_info(&self) -> UdsConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for Rewritten {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Rewritten {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Puts the rewriting pump between `client` and the returned stream (one task per connection).
pub fn wrap(client: UnixStream) -> Rewritten {
    let info = client.connect_info();
    let (ours, theirs) = tokio::io::duplex(64 * 1024);
    tokio::spawn(async move {
        let (mut cr, mut cw) = client.into_split();
        let (mut sr, mut sw) = tokio::io::split(theirs);
        tokio::select! {
            r = tokio::io::copy(&mut sr, &mut cw) => { let _ = r; }
            r = rewrite(&mut cr, &mut sw) => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "Workload API connection ended");
                }
            }
        }
    });
    Rewritten { io: ours, info }
}

/// Copies frames from `r` to `w`, re-encoding header blocks (see the module doc).
async fn rewrite<R, W>(r: &mut R, w: &mut W) -> io::Result<()>
where
    R: AsyncRead + Unpin,
    W: AsyncWrite + Unpin,
{
    let bad = |m: &str| io::Error::new(io::ErrorKind::InvalidData, m.to_string());
    let mut preface = [0u8; 24];
    r.read_exact(&mut preface).await?;
    if &preface != PREFACE {
        return Err(bad("not an HTTP/2 client preface"));
    }
    w.write_all(&preface).await?;
    let mut decoder = hpack::Decoder::new();
    let mut encoder = hpack::Encoder::new();
    // A header block in progress: its stream, whether it ends the stream, the fragments so far.
    let mut block: Option<(u32, u8, Vec<u8>)> = None;
    loop {
        let mut head = [0u8; 9];
        r.read_exact(&mut head).await?;
        let len = u32::from_be_bytes([0, head[0], head[1], head[2]]) as usize;
        let (kind, flags) = (head[3], head[4]);
        let stream = u32::from_be_bytes([head[5], head[6], head[7], head[8]]) & 0x7fff_ffff;
        if len > MAX_FRAME {
            return Err(bad("frame larger than SETTINGS_MAX_FRAME_SIZE"));
        }
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload).await?;
        let fragment = match (kind, block.take()) {
            (HEADERS, None) => {
                let mut p = &payload[..];
                let mut pad = 0;
                if flags & PADDED != 0 {
                    pad = *p
                        .first()
                        .ok_or_else(|| bad("padded HEADERS without a length"))?
                        as usize;
                    p = &p[1..];
                }
                if flags & PRIORITY != 0 {
                    // Stream priority is deprecated (RFC 9113) and dropped here.
                    p = p.get(5..).ok_or_else(|| bad("short HEADERS priority"))?;
                }
                let end = p
                    .len()
                    .checked_sub(pad)
                    .ok_or_else(|| bad("padding too long"))?;
                (stream, flags & END_STREAM, p[..end].to_vec(), flags)
            }
            (CONTINUATION, Some((s, end_stream, mut frag))) if s == stream => {
                frag.extend_from_slice(&payload);
                (s, end_stream, frag, flags)
            }
            (CONTINUATION, _) | (_, Some(_)) => {
                return Err(bad("a header block interrupted or a stray CONTINUATION"))
            }
            _ => {
                w.write_all(&head).await?;
                w.write_all(&payload).await?;
                continue;
            }
        };
        let (stream, end_stream, frag, flags) = fragment;
        if frag.len() > MAX_BLOCK {
            return Err(bad("header block too large"));
        }
        if flags & END_HEADERS == 0 {
            block = Some((stream, end_stream, frag));
            continue;
        }
        let headers = decoder
            .decode(&frag)
            .map_err(|e| bad(&format!("HPACK: {e:?}")))?;
        let encoded = encoder.encode(headers.iter().map(|(n, v)| {
            let v: &[u8] = if n == b":authority" && http::uri::Authority::try_from(&v[..]).is_err()
            {
                b"localhost"
            } else {
                v
            };
            (&n[..], v)
        }));
        write_block(w, stream, end_stream, &encoded).await?;
    }
}

/// Writes a header block as HEADERS (+ CONTINUATION frames), each at most [`MAX_FRAME`].
async fn write_block<W: AsyncWrite + Unpin>(
    w: &mut W,
    stream: u32,
    end_stream: u8,
    block: &[u8],
) -> io::Result<()> {
    let mut chunks = block.chunks(MAX_FRAME).peekable();
    let mut kind = HEADERS;
    let mut flags = end_stream;
    if chunks.peek().is_none() {
        return write_frame(w, HEADERS, flags | END_HEADERS, stream, &[]).await;
    }
    while let Some(chunk) = chunks.next() {
        let last = chunks.peek().is_none();
        write_frame(
            w,
            kind,
            flags | if last { END_HEADERS } else { 0 },
            stream,
            chunk,
        )
        .await?;
        kind = CONTINUATION;
        flags = 0;
    }
    Ok(())
}

async fn write_frame<W: AsyncWrite + Unpin>(
    w: &mut W,
    kind: u8,
    flags: u8,
    stream: u32,
    payload: &[u8],
) -> io::Result<()> {
    let len = (payload.len() as u32).to_be_bytes();
    let id = stream.to_be_bytes();
    w.write_all(&[
        len[1], len[2], len[3], kind, flags, id[0], id[1], id[2], id[3],
    ])
    .await?;
    w.write_all(payload).await
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frame(kind: u8, flags: u8, stream: u32, payload: &[u8]) -> Vec<u8> {
        let len = (payload.len() as u32).to_be_bytes();
        let id = stream.to_be_bytes();
        let mut f = vec![
            len[1], len[2], len[3], kind, flags, id[0], id[1], id[2], id[3],
        ];
        f.extend_from_slice(payload);
        f
    }

    /// A decoded header block.
    type Block = Vec<(Vec<u8>, Vec<u8>)>;

    /// Header blocks of the output, decoded, and the other frames as they are.
    fn split(mut out: &[u8]) -> (Vec<Block>, Vec<Vec<u8>>) {
        assert_eq!(&out[..24], PREFACE);
        out = &out[24..];
        let (mut dec, mut blocks, mut others) = (hpack::Decoder::new(), vec![], vec![]);
        while !out.is_empty() {
            let len = u32::from_be_bytes([0, out[0], out[1], out[2]]) as usize;
            let (f, rest) = out.split_at(9 + len);
            if f[3] == HEADERS {
                assert_eq!(f[4] & END_HEADERS, END_HEADERS);
                blocks.push(dec.decode(&f[9..]).unwrap());
            } else {
                others.push(f.to_vec());
            }
            out = rest;
        }
        (blocks, others)
    }

    #[tokio::test]
    async fn a_socket_path_authority_becomes_localhost_and_the_rest_passes_through() {
        let mut enc = hpack::Encoder::new();
        let req = |authority: &'static [u8]| {
            vec![
                (&b":method"[..], &b"POST"[..]),
                (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
                (b":authority", authority),
                (b"workload.spiffe.io", b"true"),
            ]
        };
        let first = enc.encode(req(b"tmp%2Fagent.sock"));
        let second = enc.encode(req(b"localhost:1"));
        let settings = frame(0x4, 0, 0, &[0, 3, 0, 0, 0, 100]);
        let data = frame(0x0, END_STREAM, 1, b"payload");
        let mut input = PREFACE.to_vec();
        input.extend(&settings);
        // The first block split over HEADERS (padded) and a CONTINUATION.
        let (a, b) = first.split_at(5);
        let mut padded = vec![3u8];
        padded.extend_from_slice(a);
        padded.extend_from_slice(&[0, 0, 0]);
        input.extend(frame(HEADERS, PADDED, 1, &padded));
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b));
        input.extend(&data);
        input.extend(frame(HEADERS, END_HEADERS | END_STREAM, 3, &second));
        let mut out = Vec::new();
        let err = rewrite(&mut &input[..], &mut out).await.unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::UnexpectedEof,
            "ends with the input"
        );
        let (blocks, others) = split(&out);
        assert_eq!(
            others,
            [settings, data],
            "other frames pass through unchanged"
        );
        let authority = |b: &[(Vec<u8>, Vec<u8>)]| {
            b.iter()
                .find(|(n, _)| n == b":authority")
                .unwrap()
                .1
                .clone()
        };
        assert_eq!(authority(&blocks[0]), b"localhost");
        assert_eq!(
            authority(&blocks[1]),
            b"localhost:1",
            "a valid authority is kept"
        );
        assert_eq!(blocks[0].len(), 4);
        assert!(blocks[0].contains(&(b"workload.spiffe.io".to_vec(), b"true".to_vec())));
    }

    #[tokio::test]
    async fn what_is_not_http2_is_refused() {
        let mut out = Vec::new();
        let err = rewrite(&mut &b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"[..], &mut out)
            .await
            .unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        let mut input = PREFACE.to_vec();
        input.extend(frame(CONTINUATION, END_HEADERS, 1, b"x"));
        let err = rewrite(&mut &input[..], &mut Vec::new()).await.unwrap_err();
        assert_eq!(
            err.kind(),
            io::ErrorKind::InvalidData,
            "a stray CONTINUATION"
        );
    }
}
