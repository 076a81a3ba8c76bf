//! A small gRPC echo service, `handoff.demo.Echo`, written without codegen
//! (no `protoc` needed): a unary `Say` and a server-streaming `Stream`.
//! Shared by the `grpc_server` example and the tests' client.
//!
//! ```proto
//! service Echo {
//!   rpc Say(EchoRequest) returns (EchoReply);
//!   rpc Stream(EchoRequest) returns (stream EchoReply); // count replies (0: endless), interval_ms apart
//! }
//! ```
#![allow(dead_code)]

use std::convert::Infallible;
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tonic::codegen::http;
use tonic::{Request, Response, Status};
use tonic_prost::ProstCodec;

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoRequest {
    #[prost(string, tag = "1")]
    pub message: String,
    /// `Stream`: how many replies (0: until the client hangs up).
    #[prost(uint32, tag = "2")]
    pub count: u32,
    /// `Stream`: ms between replies.
    #[prost(uint32, tag = "3")]
    pub interval_ms: u32,
}

#[derive(Clone, PartialEq, prost::Message)]
pub struct EchoReply {
    #[prost(string, tag = "1")]
    pub message: String,
    #[prost(uint32, tag = "2")]
    pub pid: u32,
    #[prost(uint64, tag = "3")]
    pub generation: u64,
}

pub const SAY: &str = "/handoff.demo.Echo/Say";
pub const STREAM: &str = "/handoff.demo.Echo/Stream";

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;
type ReplyStream = Pin<Box<dyn tokio_stream::Stream<Item = Result<EchoReply, Status>> + Send>>;

/// The server side, for `tonic::service::Routes`.
#[derive(Clone)]
pub struct EchoServer {
    pub generation: u64,
}

impl EchoServer {
    fn reply(&self, message: String) -> EchoReply {
        EchoReply {
            message,
            pid: std::process::id(),
            generation: self.generation,
        }
    }
}

impl tonic::server::NamedService for EchoServer {
    const NAME: &'static str = "handoff.demo.Echo";
}

struct Say(EchoServer);

impl tonic::server::UnaryService<EchoRequest> for Say {
    type Response = EchoReply;
    type Future = BoxFuture<Result<Response<EchoReply>, Status>>;
    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let reply = self.0.reply(request.into_inner().message);
        Box::pin(async move { Ok(Response::new(reply)) })
    }
}

struct Stream(EchoServer);

impl tonic::server::ServerStreamingService<EchoRequest> for Stream {
    type Response = EchoReply;
    type ResponseStream = ReplyStream;
    type Future = BoxFuture<Result<Response<ReplyStream>, Status>>;
    fn call(&mut self, request: Request<EchoRequest>) -> Self::Future {
        let server = self.0.clone();
        let request = request.into_inner();
        let interval = Duration::from_millis(u64::from(request.interval_ms.max(1)));
        let stream = async_stream(server, request, interval);
        Box::pin(async move { Ok(Response::new(stream)) })
    }
}

fn async_stream(server: EchoServer, request: EchoRequest, interval: Duration) -> ReplyStream {
    let (tx, rx) = tokio::sync::mpsc::channel(1);
    tokio::spawn(async move {
        let mut sent = 0u32;
        while request.count == 0 || sent < request.count {
            let reply = server.reply(format!("{} {sent}", request.message));
            if tx.send(Ok(reply)).await.is_err() {
                return; // the client hung up
            }
            sent += 1;
            tokio::time::sleep(interval).await;
        }
    });
    Box::pin(tokio_stream::wrappers::ReceiverStream::new(rx))
}

impl tower::Service<http::Request<tonic::body::Body>> for EchoServer {
    type Response = http::Response<tonic::body::Body>;
    type Error = Infallible;
    type Future = BoxFuture<Result<Self::Response, Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: http::Request<tonic::body::Body>) -> Self::Future {
        let server = self.clone();
        Box::pin(async move {
            let mut grpc =
                tonic::server::Grpc::new(ProstCodec::<EchoReply, EchoRequest>::default());
            Ok(match request.uri().path() {
                SAY => grpc.unary(Say(server), request).await,
                STREAM => grpc.server_streaming(Stream(server), request).await,
                _ => Status::unimplemented("no such method").into_http(),
            })
        })
    }
}

/// The client side, over any tonic channel.
pub struct EchoClient {
    grpc: tonic::client::Grpc<tonic::transport::Channel>,
}

impl EchoClient {
    pub fn new(channel: tonic::transport::Channel) -> Self {
        EchoClient {
            grpc: tonic::client::Grpc::new(channel),
        }
    }

    pub async fn say(&mut self, message: &str) -> Result<EchoReply, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let request = Request::new(EchoRequest {
            message: message.into(),
            ..Default::default()
        });
        let path = http::uri::PathAndQuery::from_static(SAY);
        let codec = ProstCodec::<EchoRequest, EchoReply>::default();
        Ok(self.grpc.unary(request, path, codec).await?.into_inner())
    }

    pub async fn stream(
        &mut self,
        request: EchoRequest,
    ) -> Result<tonic::Streaming<EchoReply>, Status> {
        self.grpc
            .ready()
            .await
            .map_err(|e| Status::unavailable(format!("not ready: {e}")))?;
        let path = http::uri::PathAndQuery::from_static(STREAM);
        let codec = ProstCodec::<EchoRequest, EchoReply>::default();
        Ok(self
            .grpc
            .server_streaming(Request::new(request), path, codec)
            .await?
            .into_inner())
    }
}
