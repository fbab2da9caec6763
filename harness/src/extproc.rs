//! A minimal Envoy external processor (`envoy.service.ext_proc.v3.ExternalProcessor`):
//! gRPC over HTTP/2 (the `h2` crate) with the few protobuf messages it needs encoded by
//! hand, so neither the harness nor the benchmarks need a protobuf toolchain or the
//! generated Envoy API.
//!
//! [`serve`] runs any [`Processor`]: per gRPC stream (one HTTP exchange) it gets the
//! request and response headers (name, value pairs), every body chunk, the trailers,
//! and the end of the stream, and answers each message with an empty mutation — except
//! body chunks, which it either echoes as a `StreamedBodyResponse` (Envoy's
//! `FULL_DUPLEX_STREAMED` mode) or acknowledges with an empty `BodyResponse` (`STREAMED`
//! or `BUFFERED` mode: Envoy passes the chunk on unchanged), as the processor says.
//! The benchmarks' metering processor (`bench/src/bin/meter_extproc.rs`) is one.
//!
//! [`ExtProcServer`] is the harness's stand-in for llm-d's endpoint picker (the
//! InferencePool's `ext_proc`). It works as Istio configures the InferencePool filter:
//! headers and trailers are sent to it, both bodies in `FULL_DUPLEX_STREAMED` mode, and
//! it answers each message as the endpoint picker does when it changes nothing —
//! headers and trailers with an empty mutation, every body chunk echoed back as a
//! `StreamedBodyResponse` (same bytes, same `end_of_stream`). So whatever Tollgate
//! (before it on the request path, after it on the response path) did to a body must
//! survive a processor that re-emits the body itself. It keeps what it saw of each
//! exchange ([`ExtProcServer::exchanges`]).

use crate::background::Background;
use std::net::TcpListener as StdListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use anyhow::anyhow;
use bytes::{Buf, Bytes, BytesMut};

/// What the processor saw of one HTTP exchange (one gRPC stream).
#[derive(Debug, Clone, Default)]
pub struct Exchange {
    pub request_headers: bool,
    pub request_body: Vec<u8>,
    pub response_headers: bool,
    pub response_body: Vec<u8>,
    pub request_trailers: bool,
    pub response_trailers: bool,
    /// Messages it could not decode (answered by closing the stream).
    pub bad_messages: u32,
}

#[derive(Default)]
struct Shared {
    streams: AtomicU64,
    exchanges: Mutex<Vec<Exchange>>,
}

/// Most exchanges kept for inspection (oldest dropped).
const KEEP: usize = 256;

/// How a body chunk is answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyAnswer {
    /// The same bytes back as a `StreamedBodyResponse` (`FULL_DUPLEX_STREAMED` mode).
    Echo,
    /// An empty `BodyResponse`: Envoy passes the chunk on as it is (`STREAMED` and
    /// `BUFFERED` modes).
    Continue,
}

/// What a processor does with one HTTP exchange (one gRPC stream). Every message is
/// answered with an empty mutation whatever the handler does, except body chunks (see
/// [`BodyAnswer`]).
pub trait StreamHandler: Send {
    /// Request (`response == false`) or response headers, as (name, value) pairs;
    /// pseudo-headers (`:status`, `:path`, …) included.
    fn headers(&mut self, _response: bool, _headers: &[(&[u8], &[u8])]) {}
    /// A body chunk and whether it is the last.
    fn body(&mut self, response: bool, chunk: &[u8], end_of_stream: bool) -> BodyAnswer;
    fn trailers(&mut self, _response: bool) {}
    /// A message that could not be decoded (the stream is then closed).
    fn bad_message(&mut self) {}
    /// The gRPC stream ended (Envoy half-closed it, reset it, or a message was bad).
    fn end(self: Box<Self>) {}
}

/// Makes a [`StreamHandler`] for each gRPC stream.
pub trait Processor: Send + Sync + 'static {
    fn open(&self) -> Box<dyn StreamHandler>;
}

impl StreamHandler for Exchange {
    fn headers(&mut self, response: bool, _headers: &[(&[u8], &[u8])]) {
        if response {
            self.response_headers = true;
        } else {
            self.request_headers = true;
        }
    }

    fn body(&mut self, response: bool, chunk: &[u8], _end_of_stream: bool) -> BodyAnswer {
        let seen = if response { &mut self.response_body } else { &mut self.request_body };
        seen.extend_from_slice(chunk);
        BodyAnswer::Echo
    }

    fn trailers(&mut self, response: bool) {
        if response {
            self.response_trailers = true;
        } else {
            self.request_trailers = true;
        }
    }

    fn bad_message(&mut self) {
        self.bad_messages += 1;
    }
}

/// The harness's processor: echoes bodies and keeps what each exchange saw.
struct Recorder(Arc<Shared>);

/// One exchange being recorded; filed with the others when its stream ends.
struct Recording {
    exchange: Exchange,
    shared: Arc<Shared>,
}

impl Processor for Recorder {
    fn open(&self) -> Box<dyn StreamHandler> {
        self.0.streams.fetch_add(1, Ordering::Relaxed);
        Box::new(Recording { exchange: Exchange::default(), shared: Arc::clone(&self.0) })
    }
}

impl StreamHandler for Recording {
    fn headers(&mut self, response: bool, headers: &[(&[u8], &[u8])]) {
        self.exchange.headers(response, headers);
    }

    fn body(&mut self, response: bool, chunk: &[u8], end_of_stream: bool) -> BodyAnswer {
        self.exchange.body(response, chunk, end_of_stream)
    }

    fn trailers(&mut self, response: bool) {
        self.exchange.trailers(response);
    }

    fn bad_message(&mut self) {
        self.exchange.bad_message();
    }

    fn end(self: Box<Self>) {
        let mut all = self.shared.exchanges.lock().unwrap_or_else(PoisonError::into_inner);
        if all.len() >= KEEP {
            all.remove(0);
        }
        all.push(self.exchange);
    }
}

/// The ext_proc server on 127.0.0.1; stopped when dropped.
pub struct ExtProcServer {
    pub port: u16,
    shared: Arc<Shared>,
    _server: Background,
}

impl ExtProcServer {
    pub fn start() -> anyhow::Result<ExtProcServer> {
        let listener = StdListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let port = listener.local_addr()?.port();
        let shared = Arc::new(Shared::default());
        let loop_shared = Arc::clone(&shared);
        let (server, ()) = Background::spawn("ext-proc", move |ready, stop| async move {
            let listener = match tokio::net::TcpListener::from_std(listener) {
                Ok(l) => l,
                Err(e) => return ready.fail(anyhow!("ext_proc listener: {e}")),
            };
            ready.ok(());
            tokio::select! {
                _ = serve(listener, Arc::new(Recorder(loop_shared))) => {}
                _ = stop => {}
            }
        })?;
        Ok(ExtProcServer { port, shared, _server: server })
    }

    /// gRPC streams opened by Envoy (one per HTTP exchange the filter processed).
    pub fn streams(&self) -> u64 {
        self.shared.streams.load(Ordering::Relaxed)
    }

    /// The exchanges whose gRPC stream has ended, oldest first (at most 256).
    pub fn exchanges(&self) -> Vec<Exchange> {
        self.shared.exchanges.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }
}

/// Serves `processor` on `listener` until the future is dropped: every connection and
/// every gRPC stream its own task.
pub async fn serve(listener: tokio::net::TcpListener, processor: Arc<dyn Processor>) {
    loop {
        let Ok((socket, _)) = listener.accept().await else { continue };
        let _ = socket.set_nodelay(true);
        let processor = Arc::clone(&processor);
        tokio::spawn(async move {
            let Ok(mut conn) = h2::server::handshake(socket).await else { return };
            while let Some(Ok((request, respond))) = conn.accept().await {
                let mut handler = processor.open();
                tokio::spawn(async move {
                    let _ = process(request, respond, handler.as_mut()).await;
                    handler.end();
                });
            }
        });
    }
}

/// One `Process` call: answers every `ProcessingRequest` in order, then ends the
/// response with `grpc-status: 0` when Envoy half-closes.
async fn process(
    request: http::Request<h2::RecvStream>,
    mut respond: h2::server::SendResponse<Bytes>,
    handler: &mut dyn StreamHandler,
) -> anyhow::Result<()> {
    let response = http::Response::builder().status(200).header("content-type", "application/grpc").body(())?;
    let mut send = respond.send_response(response, false)?;
    let mut body = request.into_body();
    let mut buf = BytesMut::new();
    while let Some(chunk) = body.data().await {
        let chunk = chunk?;
        let _ = body.flow_control().release_capacity(chunk.len());
        buf.extend_from_slice(&chunk);
        // gRPC framing: 1 byte compressed flag, 4 bytes big-endian length, the message.
        while let Some(prefix) = buf.get(1..5) {
            let len = u32::from_be_bytes(prefix.try_into()?) as usize;
            if buf.len() < 5 + len {
                break;
            }
            buf.advance(5);
            let message = buf.split_to(len).freeze();
            match answer(&message, handler) {
                Some(reply) => send_all(&mut send, grpc_frame(&reply)).await?,
                None => {
                    handler.bad_message();
                    let mut trailers = http::HeaderMap::new();
                    trailers.insert("grpc-status", http::HeaderValue::from_static("3"));
                    send.send_trailers(trailers)?;
                    return Ok(());
                }
            }
        }
    }
    let mut trailers = http::HeaderMap::new();
    trailers.insert("grpc-status", http::HeaderValue::from_static("0"));
    send.send_trailers(trailers)?;
    Ok(())
}

async fn send_all(send: &mut h2::SendStream<Bytes>, mut data: Bytes) -> anyhow::Result<()> {
    while !data.is_empty() {
        send.reserve_capacity(data.len());
        let cap = futures_util::future::poll_fn(|cx| send.poll_capacity(cx))
            .await
            .ok_or_else(|| anyhow!("ext_proc stream closed"))??;
        if cap == 0 {
            continue;
        }
        let piece = data.split_to(cap.min(data.len()));
        send.send_data(piece, false)?;
    }
    Ok(())
}

fn grpc_frame(message: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(5 + message.len());
    out.push(0);
    out.extend_from_slice(&(message.len() as u32).to_be_bytes());
    out.extend_from_slice(message);
    Bytes::from(out)
}

// --- protobuf, by hand ------------------------------------------------------------------
//
// ProcessingRequest oneof:  request_headers = 2, response_headers = 3 (HttpHeaders),
//   request_body = 4, response_body = 5 (HttpBody {bytes body = 1; bool end_of_stream = 2}),
//   request_trailers = 6, response_trailers = 7 (HttpTrailers).
// ProcessingResponse oneof: request_headers = 1, response_headers = 2 (HeadersResponse
//   {CommonResponse response = 1}), request_body = 3, response_body = 4 (BodyResponse
//   {CommonResponse response = 1}), request_trailers = 5, response_trailers = 6
//   (TrailersResponse {HeaderMutation header_mutation = 1}).
// CommonResponse {BodyMutation body_mutation = 3}; BodyMutation {StreamedBodyResponse
//   streamed_response = 3}; StreamedBodyResponse {bytes body = 1; bool end_of_stream = 2}.

/// The answer to one ProcessingRequest, or `None` if it cannot be decoded.
fn answer(message: &[u8], handler: &mut dyn StreamHandler) -> Option<Vec<u8>> {
    let fields = decode(message)?;
    for (number, value) in fields {
        let Field::Bytes(payload) = value else { continue };
        let reply = match number {
            2 | 3 => {
                let pairs = header_pairs(payload)?;
                handler.headers(number == 3, &pairs);
                len_field(number - 1, &len_field(1, &[]))
            }
            4 | 5 => {
                let (body, eos) = http_body(payload)?;
                let field = if number == 4 { 3 } else { 4 };
                match handler.body(number == 5, body, eos) {
                    BodyAnswer::Continue => len_field(field, &len_field(1, &[])),
                    BodyAnswer::Echo => {
                        let mut streamed = len_field(1, body);
                        if eos {
                            streamed.extend_from_slice(&[0x10, 0x01]);
                        }
                        let mutation = len_field(3, &streamed);
                        let common = len_field(3, &mutation);
                        len_field(field, &len_field(1, &common))
                    }
                }
            }
            6 | 7 => {
                handler.trailers(number == 7);
                len_field(number - 1, &len_field(1, &[]))
            }
            _ => continue,
        };
        return Some(reply);
    }
    None
}

/// The (name, value) pairs of an `HttpHeaders` message: `HttpHeaders {HeaderMap headers
/// = 1}`, `HeaderMap {repeated HeaderValue headers = 1}`, `HeaderValue {string key = 1;
/// string value = 2; bytes raw_value = 3}` (Envoy sends `raw_value`; `value` read too).
fn header_pairs(payload: &[u8]) -> Option<Vec<(&[u8], &[u8])>> {
    let mut out = Vec::new();
    for (number, value) in decode(payload)? {
        let (1, Field::Bytes(map)) = (number, value) else { continue };
        for (number, value) in decode(map)? {
            let (1, Field::Bytes(header)) = (number, value) else { continue };
            let (mut key, mut val): (&[u8], &[u8]) = (&[], &[]);
            for (number, value) in decode(header)? {
                match (number, value) {
                    (1, Field::Bytes(b)) => key = b,
                    (2 | 3, Field::Bytes(b)) => val = b,
                    _ => {}
                }
            }
            out.push((key, val));
        }
    }
    Some(out)
}

fn http_body(payload: &[u8]) -> Option<(&[u8], bool)> {
    let mut body: &[u8] = &[];
    let mut eos = false;
    for (number, value) in decode(payload)? {
        match (number, value) {
            (1, Field::Bytes(b)) => body = b,
            (2, Field::Varint(v)) => eos = v != 0,
            _ => {}
        }
    }
    Some((body, eos))
}

enum Field<'a> {
    Varint(u64),
    Bytes(&'a [u8]),
    Fixed,
}

fn varint(data: &mut &[u8]) -> Option<u64> {
    let mut out = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first()?;
        *data = rest;
        out |= u64::from(b & 0x7f) << shift;
        if b & 0x80 == 0 {
            return Some(out);
        }
    }
    None
}

fn decode(mut data: &[u8]) -> Option<Vec<(u64, Field<'_>)>> {
    let mut out = Vec::new();
    while !data.is_empty() {
        let key = varint(&mut data)?;
        let field = match key & 7 {
            0 => Field::Varint(varint(&mut data)?),
            1 => {
                data = data.get(8..)?;
                Field::Fixed
            }
            2 => {
                let len = usize::try_from(varint(&mut data)?).ok()?;
                let value = data.get(..len)?;
                data = data.get(len..)?;
                Field::Bytes(value)
            }
            5 => {
                data = data.get(4..)?;
                Field::Fixed
            }
            _ => return None,
        };
        out.push((key >> 3, field));
    }
    Some(out)
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn len_field(number: u64, value: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(value.len() + 6);
    put_varint(&mut out, (number << 3) | 2);
    put_varint(&mut out, value.len() as u64);
    out.extend_from_slice(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn headers_get_an_empty_mutation() {
        let mut ex = Exchange::default();
        // ProcessingRequest { request_headers { end_of_stream: true } }
        let req = len_field(2, &[0x18, 0x01]);
        assert_eq!(answer(&req, &mut ex).unwrap(), [0x0a, 0x02, 0x0a, 0x00]);
        assert!(ex.request_headers);
        let req = len_field(3, &[]);
        assert_eq!(answer(&req, &mut ex).unwrap(), [0x12, 0x02, 0x0a, 0x00]);
    }

    #[test]
    fn body_chunks_are_echoed_as_streamed_responses() {
        let mut ex = Exchange::default();
        let mut body = len_field(1, b"hello");
        body.extend_from_slice(&[0x10, 0x01]);
        let req = len_field(4, &body);
        let reply = answer(&req, &mut ex).unwrap();
        // request_body(3) { response(1) { body_mutation(3) { streamed_response(3) { body, eos } } } }
        let mut streamed = len_field(1, b"hello");
        streamed.extend_from_slice(&[0x10, 0x01]);
        assert_eq!(reply, len_field(3, &len_field(1, &len_field(3, &len_field(3, &streamed)))));
        assert_eq!(ex.request_body, b"hello");
        // A response chunk without end_of_stream, with a long (multi-byte length) body.
        let chunk = vec![b'x'; 300];
        let reply = answer(&len_field(5, &len_field(1, &chunk)), &mut ex).unwrap();
        assert_eq!(reply, len_field(4, &len_field(1, &len_field(3, &len_field(3, &len_field(1, &chunk))))));
        assert_eq!(ex.response_body.len(), 300);
    }

    /// A processor in `STREAMED` mode: sees the headers, acknowledges chunks unchanged.
    #[derive(Default)]
    struct Counting {
        headers: Vec<(bool, Vec<(Vec<u8>, Vec<u8>)>)>,
        bytes: usize,
    }

    impl StreamHandler for Counting {
        fn headers(&mut self, response: bool, headers: &[(&[u8], &[u8])]) {
            self.headers.push((response, headers.iter().map(|(k, v)| (k.to_vec(), v.to_vec())).collect()));
        }

        fn body(&mut self, _response: bool, chunk: &[u8], _end_of_stream: bool) -> BodyAnswer {
            self.bytes += chunk.len();
            BodyAnswer::Continue
        }
    }

    #[test]
    fn headers_are_decoded_and_chunks_acknowledged_unchanged() {
        let mut c = Counting::default();
        // HeaderValue {key, raw_value} (as Envoy sends it) and {key, value}.
        let mut raw = len_field(1, b":status");
        raw.extend_from_slice(&len_field(3, b"200"));
        let mut plain = len_field(1, b"content-type");
        plain.extend_from_slice(&len_field(2, b"text/event-stream"));
        let mut map = len_field(1, &raw);
        map.extend_from_slice(&len_field(1, &plain));
        let reply = answer(&len_field(3, &len_field(1, &map)), &mut c).unwrap();
        assert_eq!(reply, [0x12, 0x02, 0x0a, 0x00]);
        assert_eq!(
            c.headers,
            vec![(
                true,
                vec![(b":status".to_vec(), b"200".to_vec()), (b"content-type".to_vec(), b"text/event-stream".to_vec())]
            )]
        );
        // response_body → BodyResponse(4) { CommonResponse(1) {} }: passed on as it is.
        let reply = answer(&len_field(5, &len_field(1, b"data: x\n\n")), &mut c).unwrap();
        assert_eq!(reply, [0x22, 0x02, 0x0a, 0x00]);
        assert_eq!(c.bytes, 9);
    }

    #[test]
    fn garbage_is_refused() {
        let mut ex = Exchange::default();
        assert!(answer(&[0xff], &mut ex).is_none());
        assert!(answer(&[], &mut ex).is_none());
    }
}

#[cfg(test)]
mod wire_tests {
    use super::*;

    /// A gRPC client over h2 against the real server: one Process call with a headers
    /// message and a body chunk, answered in order, ended with grpc-status 0.
    #[test]
    fn serves_grpc_over_http2() {
        let server = ExtProcServer::start().unwrap();
        let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
        rt.block_on(async {
            let tcp = tokio::net::TcpStream::connect(("127.0.0.1", server.port)).await.unwrap();
            let (client, conn) = h2::client::handshake(tcp).await.unwrap();
            tokio::spawn(async move {
                let _ = conn.await;
            });
            let mut client = client.ready().await.unwrap();
            let request = http::Request::builder()
                .method("POST")
                .uri(format!("http://127.0.0.1:{}/envoy.service.ext_proc.v3.ExternalProcessor/Process", server.port))
                .header("content-type", "application/grpc")
                .header("te", "trailers")
                .body(())
                .unwrap();
            let (response, mut send) = client.send_request(request, false).unwrap();
            let mut body = len_field(1, b"abc");
            body.extend_from_slice(&[0x10, 0x01]);
            let mut out = grpc_frame(&len_field(2, &[])).to_vec();
            out.extend_from_slice(&grpc_frame(&len_field(4, &body)));
            send.send_data(Bytes::from(out), true).unwrap();
            let response = response.await.unwrap();
            assert_eq!(response.status(), 200);
            let mut recv = response.into_body();
            let mut got = Vec::new();
            while let Some(chunk) = recv.data().await {
                let chunk = chunk.unwrap();
                let _ = recv.flow_control().release_capacity(chunk.len());
                got.extend_from_slice(&chunk);
            }
            let trailers = recv.trailers().await.unwrap().unwrap();
            assert_eq!(trailers["grpc-status"], "0");
            let mut want = grpc_frame(&[0x0a, 0x02, 0x0a, 0x00]).to_vec();
            let mut streamed = len_field(1, b"abc");
            streamed.extend_from_slice(&[0x10, 0x01]);
            want.extend_from_slice(&grpc_frame(&len_field(3, &len_field(1, &len_field(3, &len_field(3, &streamed))))));
            assert_eq!(got, want);
        });
        let x = server.exchanges();
        assert_eq!(x.len(), 1);
        assert_eq!(x[0].request_body, b"abc");
    }
}
