//! The ceiling for sluice's sync path: the same response as `examples/hello`, from hyper with no
//! wasm, shaped like sluice's server (one current-thread runtime per core on `SO_REUSEPORT`
//! sockets, HTTP/1.1 keep-alive). Prints `listening on http://ADDR/` like `sluice serve`.
//!
//! Usage: native-hello [ADDR]   (default 127.0.0.1:0; threads: NATIVE_HELLO_THREADS or the cores)
use std::convert::Infallible;
use std::io::Write;
use std::net::SocketAddr;

use bytes::Bytes;
use http_body_util::Full;
use hyper::{Request, Response, server::conn::http1, service::service_fn};
use hyper_util::rt::TokioIo;

const BODY: &[u8] = b"hello from sluice\n";

fn bind(addr: SocketAddr) -> std::io::Result<std::net::TcpListener> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    Ok(socket.into())
}

async fn hello(_: Request<hyper::body::Incoming>) -> Result<Response<Full<Bytes>>, Infallible> {
    Ok(Response::builder()
        .header("content-type", "text/plain")
        .body(Full::new(Bytes::from_static(BODY)))
        .expect("a static response"))
}

async fn serve(listener: std::net::TcpListener) {
    let listener = tokio::net::TcpListener::from_std(listener).expect("registering the listener");
    loop {
        let Ok((stream, _)) = listener.accept().await else { continue };
        let _ = stream.set_nodelay(true);
        tokio::task::spawn(async move {
            let _ = http1::Builder::new().serve_connection(TokioIo::new(stream), service_fn(hello)).await;
        });
    }
}

fn main() -> std::io::Result<()> {
    let addr: SocketAddr = std::env::args().nth(1).as_deref().unwrap_or("127.0.0.1:0").parse().expect("ADDR");
    let threads = std::env::var("NATIVE_HELLO_THREADS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| std::thread::available_parallelism().map_or(1, |n| n.get()));
    let first = bind(addr)?;
    let addr = first.local_addr()?;
    let mut listeners = vec![first];
    for _ in 1..threads {
        listeners.push(bind(addr)?);
    }
    // One write, so a reader never sees half an address.
    std::io::stderr().write_all(format!("listening on http://{addr}/\n").as_bytes())?;
    let workers: Vec<_> = listeners
        .into_iter()
        .map(|l| {
            std::thread::spawn(move || {
                let rt =
                    tokio::runtime::Builder::new_current_thread().enable_all().build().expect("a runtime");
                rt.block_on(serve(l));
            })
        })
        .collect();
    for w in workers {
        let _ = w.join();
    }
    Ok(())
}
