//! A TCP proxy on loopback that a test can freeze: while frozen it forwards no byte either
//! way and connects nothing new upstream, so to the client the server has gone silent, as in
//! a network partition (the connection stays open; only timeouts can tell). Thawed, it
//! forwards what waited.

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

pub struct Proxy {
    pub port: u16,
    frozen: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
}

impl Proxy {
    /// Forwards a free loopback port to `127.0.0.1:upstream`.
    pub fn start(upstream: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        listener.set_nonblocking(true).unwrap();
        let frozen = Arc::new(AtomicBool::new(false));
        let stop = Arc::new(AtomicBool::new(false));
        let (accept_frozen, accept_stop) = (frozen.clone(), stop.clone());
        std::thread::spawn(move || {
            while !accept_stop.load(Ordering::SeqCst) {
                let client = match listener.accept() {
                    Ok((client, _)) => client,
                    Err(_) => {
                        std::thread::sleep(Duration::from_millis(20));
                        continue;
                    }
                };
                let (frozen, stop) = (accept_frozen.clone(), accept_stop.clone());
                std::thread::spawn(move || connect(client, upstream, &frozen, &stop));
            }
        });
        Proxy { port, frozen, stop }
    }

    pub fn freeze(&self) {
        self.frozen.store(true, Ordering::SeqCst);
    }

    pub fn thaw(&self) {
        self.frozen.store(false, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        self.thaw();
    }
}

/// Waits out a freeze; false once the proxy stops.
fn wait_thawed(frozen: &AtomicBool, stop: &AtomicBool) -> bool {
    while frozen.load(Ordering::SeqCst) {
        if stop.load(Ordering::SeqCst) {
            return false;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    !stop.load(Ordering::SeqCst)
}

fn connect(client: TcpStream, upstream: u16, frozen: &Arc<AtomicBool>, stop: &Arc<AtomicBool>) {
    client.set_nonblocking(false).unwrap();
    if !wait_thawed(frozen, stop) {
        return;
    }
    let Ok(server) = TcpStream::connect(("127.0.0.1", upstream)) else {
        let _ = client.shutdown(Shutdown::Both);
        return;
    };
    let (client_in, server_out) = (client.try_clone().unwrap(), server.try_clone().unwrap());
    let (up_frozen, up_stop) = (frozen.clone(), stop.clone());
    std::thread::spawn(move || pump(client_in, server_out, &up_frozen, &up_stop));
    pump(server, client, frozen, stop);
}

/// Copies `from` to `to`, holding each chunk while frozen.
fn pump(mut from: TcpStream, mut to: TcpStream, frozen: &AtomicBool, stop: &AtomicBool) {
    let mut buffer = [0u8; 16 * 1024];
    loop {
        let read = match from.read(&mut buffer) {
            Ok(0) | Err(_) => break,
            Ok(read) => read,
        };
        if !wait_thawed(frozen, stop) || to.write_all(&buffer[..read]).is_err() {
            break;
        }
    }
    let _ = to.shutdown(Shutdown::Write);
}
