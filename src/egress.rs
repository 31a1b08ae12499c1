//! The network a preview's terraform process may reach: the AWS endpoints, nothing else.
//!
//! A preview runs provider code from an unmerged commit. Landlock ([`crate::sandbox`]) bounds
//! what it reads; this module bounds where it can send what it read. The child is moved into a
//! private user and network namespace between fork and exec, where only a loopback interface
//! exists. Before exec it opens listening sockets on that loopback and hands them to the daemon
//! over a socket pair; the daemon, still in the host's network, serves them:
//!
//! - an HTTPS proxy (`HTTPS_PROXY` in the child's environment) that takes `CONNECT` only to
//!   port 443 of an AWS host name (`*.amazonaws.com`, `*.amazonaws.com.cn`, `*.api.aws`), to the
//!   host and port of a non-loopback `aws.endpoint_url`, and, when providers are not served
//!   from a mirror, to the provider registry; every other request gets `403` and a warning;
//! - a forward for a loopback `aws.endpoint_url` (an emulator), listening on the same address
//!   inside, so the child's configuration stays as it is.
//!
//! A process in the namespace has no route anywhere else: a connection to any other address,
//! on loopback or off it, fails at once.
//!
//! Like the Landlock ruleset, everything the child needs is built before the fork; between fork
//! and exec it only makes system calls on prepared buffers (unshare, three small writes to
//! `/proc/self`, an ioctl, socket/bind/listen, one sendmsg).

use std::io;
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener as StdListener};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::Arc;
use std::time::Duration;

use nix::libc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;

/// Where the proxy listens inside the namespace, unless a forward already takes the port.
const PROXY_PORT: u16 = 3128;

/// At most this many listeners (the proxy and the forwards) per process.
const MAX_LISTENERS: usize = 8;

/// The longest `CONNECT` request head the proxy reads, and how long it waits for it.
const HEAD_LIMIT: usize = 8 * 1024;
const HEAD_TIMEOUT: Duration = Duration::from_secs(10);

/// How long the proxy waits for a connection to an allowed host.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Host name suffixes of AWS service endpoints.
const AWS_SUFFIXES: [&str; 3] = [".amazonaws.com", ".amazonaws.com.cn", ".api.aws"];

/// Hosts `terraform init` downloads providers from when no mirror is configured.
const REGISTRY_HOSTS: [&str; 2] = ["registry.terraform.io", "releases.hashicorp.com"];

/// What a process in a private network may reach.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EgressPolicy {
    /// Loopback addresses served inside the namespace by a plain forward to the same address.
    forward: Vec<SocketAddr>,
    /// Exact `host:port` pairs the proxy also lets through.
    exact: Vec<(String, u16)>,
}

impl EgressPolicy {
    /// AWS and, when set, `endpoint_url` (the daemon's `aws.endpoint_url`); the provider
    /// registry too when providers are not installed from a mirror.
    pub fn aws(endpoint_url: Option<&str>, registry: bool) -> EgressPolicy {
        let mut policy = EgressPolicy {
            forward: Vec::new(),
            exact: Vec::new(),
        };
        if registry {
            policy.exact = REGISTRY_HOSTS
                .iter()
                .map(|h| (h.to_string(), 443))
                .collect();
        }
        let endpoint = endpoint_url.and_then(|u| url::Url::parse(u).ok());
        if let Some(endpoint) = endpoint
            && let (Some(host), Some(port)) = (endpoint.host(), endpoint.port_or_known_default())
        {
            let loopback = match host {
                url::Host::Ipv4(ip) if ip.is_loopback() => Some(IpAddr::V4(ip)),
                url::Host::Ipv6(ip) if ip.is_loopback() => Some(IpAddr::V6(ip)),
                url::Host::Domain("localhost") => Some(IpAddr::V4(Ipv4Addr::LOCALHOST)),
                _ => None,
            };
            match loopback {
                Some(ip) => policy.forward.push(SocketAddr::new(ip, port)),
                None => policy
                    .exact
                    .push((host.to_string().to_ascii_lowercase(), port)),
            }
        }
        policy
    }

    /// The address the proxy listens on inside the namespace.
    pub fn proxy_address(&self) -> SocketAddr {
        let mut port = PROXY_PORT;
        while self.forward.iter().any(|f| f.port() == port) {
            port += 1;
        }
        SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
    }

    /// The variables that send the child's HTTP clients through the proxy.
    pub fn proxy_variables(&self) -> Vec<(String, String)> {
        let proxy = format!("http://{}", self.proxy_address());
        let mut variables = Vec::new();
        for name in ["HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"] {
            variables.push((name.to_string(), proxy.clone()));
        }
        for name in ["NO_PROXY", "no_proxy"] {
            variables.push((name.to_string(), "127.0.0.1,localhost,::1".to_string()));
        }
        variables
    }

    /// Whether the proxy lets a `CONNECT` to `host:port` through.
    fn allows(&self, host: &str, port: u16) -> bool {
        let host = host.trim_end_matches('.').to_ascii_lowercase();
        if self.exact.iter().any(|(h, p)| *h == host && *p == port) {
            return true;
        }
        let is_name = host.parse::<IpAddr>().is_err()
            && !host.is_empty()
            && host
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        port == 443
            && is_name
            && AWS_SUFFIXES
                .iter()
                .any(|suffix| host.len() > suffix.len() && host.ends_with(suffix))
    }

    /// Builds what the child needs between fork and exec. Allocates and may fail; the result
    /// only makes system calls.
    pub fn prepare(&self) -> io::Result<(Enter, Receiver)> {
        let mut addresses = vec![self.proxy_address()];
        addresses.extend(self.forward.iter().copied());
        if addresses.len() > MAX_LISTENERS {
            return Err(io::Error::other(format!(
                "a private network takes at most {} forwards",
                MAX_LISTENERS - 1
            )));
        }
        let (ours, theirs) = socket_pair()?;
        // SAFETY: getuid and getgid cannot fail.
        let (uid, gid) = unsafe { (libc::getuid(), libc::getgid()) };
        let enter = Enter {
            uid_map: format!("{uid} {uid} 1").into_bytes(),
            gid_map: format!("{gid} {gid} 1").into_bytes(),
            addresses: addresses.iter().map(RawAddress::new).collect(),
            channel: theirs,
        };
        let receiver = Receiver {
            channel: ours,
            policy: Arc::new(self.clone()),
            count: addresses.len(),
        };
        Ok((enter, receiver))
    }
}

/// Fails unless this machine lets a process enter a private network (user namespaces may be
/// forbidden: `kernel.unprivileged_userns_clone=0`, a container's seccomp profile, a systemd
/// unit's `RestrictNamespaces=`). The daemon calls it at start when previews are isolated.
pub async fn probe() -> Result<(), String> {
    let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())].into();
    let spec = crate::process::ProcessSpec::new("/bin/sh", "/")
        .args(["-c", "exit 0"])
        .env(env)
        .timeout(Duration::from_secs(30), Duration::from_secs(1))
        .egress(EgressPolicy::aws(None, false));
    let cancel = tokio_util::sync::CancellationToken::new();
    match crate::process::run(&spec, &cancel).await {
        Ok(output) if output.success() => Ok(()),
        Ok(output) => Err(format!(
            "a probe in a private network exited with {:?}",
            output.code
        )),
        Err(e) => Err(e.to_string()),
    }
}

/// What the child runs between fork and exec: [`Enter::enter`].
pub struct Enter {
    uid_map: Vec<u8>,
    gid_map: Vec<u8>,
    addresses: Vec<RawAddress>,
    /// The child's end of the socket pair (close-on-exec).
    channel: OwnedFd,
}

impl Enter {
    /// Moves this process into a private user and network namespace, brings its loopback up,
    /// opens the listeners and sends them to the daemon. Only system calls on buffers built
    /// before the fork: no allocation, no lock.
    pub fn enter(&self) -> io::Result<()> {
        // SAFETY: every call below takes pointers into buffers owned by `self` or the stack
        // and checks its result; descriptors opened here are close-on-exec.
        unsafe {
            check(libc::unshare(libc::CLONE_NEWUSER | libc::CLONE_NEWNET))?;
            write_proc(c"/proc/self/setgroups", b"deny")?;
            write_proc(c"/proc/self/uid_map", &self.uid_map)?;
            write_proc(c"/proc/self/gid_map", &self.gid_map)?;
            loopback_up()?;
            let mut fds = [-1 as RawFd; MAX_LISTENERS];
            for (slot, address) in fds.iter_mut().zip(&self.addresses) {
                *slot = address.listen()?;
            }
            send_fds(self.channel.as_raw_fd(), &fds[..self.addresses.len()])
        }
    }
}

/// The daemon's end: receives the child's listeners after spawn and serves them.
pub struct Receiver {
    channel: OwnedFd,
    policy: Arc<EgressPolicy>,
    count: usize,
}

impl Receiver {
    /// Takes the listeners the child sent (it has exec'd, so they were sent) and starts
    /// serving them. Serving stops when the returned [`Gate`] is dropped.
    pub fn serve(self) -> io::Result<Gate> {
        let fds = receive_fds(self.channel.as_raw_fd(), self.count)?;
        let mut tasks = JoinSet::new();
        let mut listeners = Vec::new();
        for fd in fds {
            let listener = StdListener::from(fd);
            listener.set_nonblocking(true)?;
            listeners.push(TcpListener::from_std(listener)?);
        }
        let mut listeners = listeners.into_iter();
        let proxy = listeners
            .next()
            .ok_or_else(|| io::Error::other("no proxy listener"))?;
        tasks.spawn(accept(proxy, {
            let policy = self.policy.clone();
            move |stream| tunnel(stream, policy.clone())
        }));
        for (listener, target) in listeners.zip(self.policy.forward.clone()) {
            tasks.spawn(accept(listener, move |stream| forward(stream, target)));
        }
        Ok(Gate { _tasks: tasks })
    }
}

/// Serves a process's private network while it lives; dropping it closes every connection.
pub struct Gate {
    _tasks: JoinSet<()>,
}

async fn accept<F, Fut>(listener: TcpListener, handle: F)
where
    F: Fn(TcpStream) -> Fut,
    Fut: Future<Output = ()> + Send + 'static,
{
    // Dropping this task drops the set, which aborts every connection it serves.
    let mut connections = JoinSet::new();
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => { connections.spawn(handle(stream)); }
                Err(e) => {
                    tracing::warn!(error = %e, "preview network: accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            },
            Some(_) = connections.join_next(), if !connections.is_empty() => {}
        }
    }
}

async fn forward(mut inbound: TcpStream, target: SocketAddr) {
    match TcpStream::connect(target).await {
        Ok(mut outbound) => {
            let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
        }
        Err(e) => tracing::debug!(%target, error = %e, "preview network: forward failed"),
    }
}

/// One `CONNECT` through the allow-listing proxy.
async fn tunnel(mut inbound: TcpStream, policy: Arc<EgressPolicy>) {
    let head = match tokio::time::timeout(HEAD_TIMEOUT, read_head(&mut inbound)).await {
        Ok(Ok(head)) => head,
        _ => return,
    };
    let (target, rest) = match parse_connect(&head) {
        Ok(parsed) => parsed,
        Err(reason) => {
            tracing::warn!(%reason, "preview network: refused a request that is not an allowed CONNECT");
            let _ = inbound.write_all(FORBIDDEN).await;
            return;
        }
    };
    let (host, port) = target;
    if !policy.allows(&host, port) {
        tracing::warn!(%host, port, "preview network: refused a connection to a host outside AWS");
        let _ = inbound.write_all(FORBIDDEN).await;
        return;
    }
    let connected =
        tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect((host.as_str(), port)))
            .await
            .unwrap_or_else(|_| Err(io::ErrorKind::TimedOut.into()));
    let mut outbound = match connected {
        Ok(stream) => stream,
        Err(e) => {
            tracing::debug!(%host, port, error = %e, "preview network: connect failed");
            let _ = inbound.write_all(BAD_GATEWAY).await;
            return;
        }
    };
    if inbound.write_all(ESTABLISHED).await.is_err() || outbound.write_all(rest).await.is_err() {
        return;
    }
    let _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
}

const ESTABLISHED: &[u8] = b"HTTP/1.1 200 Connection established\r\n\r\n";
const FORBIDDEN: &[u8] =
    b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";
const BAD_GATEWAY: &[u8] =
    b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n";

/// Reads up to the end of a request head (and whatever followed it in the same reads).
async fn read_head(stream: &mut TcpStream) -> io::Result<Vec<u8>> {
    let mut head = Vec::new();
    let mut chunk = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        if head.len() >= HEAD_LIMIT {
            return Err(io::Error::other("request head too long"));
        }
        let read = stream.read(&mut chunk).await?;
        if read == 0 {
            return Err(io::ErrorKind::UnexpectedEof.into());
        }
        head.extend_from_slice(&chunk[..read]);
    }
    Ok(head)
}

/// The `host:port` of a `CONNECT` request head and the bytes after the head.
fn parse_connect(head: &[u8]) -> Result<((String, u16), &[u8]), String> {
    let mut headers = [httparse::EMPTY_HEADER; 32];
    let mut request = httparse::Request::new(&mut headers);
    let length = match request.parse(head) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) => return Err("an incomplete request head".into()),
        Err(e) => return Err(format!("a malformed request head: {e}")),
    };
    let (method, target) = (request.method.unwrap_or(""), request.path.unwrap_or(""));
    if method != "CONNECT" {
        return Err(format!("{method} {target}: only CONNECT is proxied"));
    }
    let (host, port) = target
        .rsplit_once(':')
        .ok_or_else(|| format!("CONNECT {target}: no port"))?;
    let port = port
        .parse::<u16>()
        .map_err(|_| format!("CONNECT {target}: not a port"))?;
    let host = host.trim_start_matches('[').trim_end_matches(']');
    Ok(((host.to_string(), port), &head[length..]))
}

/// A socket address in the form `bind` takes, built before the fork.
struct RawAddress {
    storage: libc::sockaddr_storage,
    length: libc::socklen_t,
    family: libc::c_int,
}

impl RawAddress {
    fn new(address: &SocketAddr) -> RawAddress {
        // SAFETY: sockaddr_storage is plain data; all-zero is a valid value.
        let mut storage: libc::sockaddr_storage = unsafe { std::mem::zeroed() };
        let (length, family) = match address {
            SocketAddr::V4(v4) => {
                let raw = libc::sockaddr_in {
                    sin_family: libc::AF_INET as libc::sa_family_t,
                    sin_port: v4.port().to_be(),
                    sin_addr: libc::in_addr {
                        s_addr: u32::from(*v4.ip()).to_be(),
                    },
                    sin_zero: [0; 8],
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in, raw) };
                (size_of::<libc::sockaddr_in>(), libc::AF_INET)
            }
            SocketAddr::V6(v6) => {
                let raw = libc::sockaddr_in6 {
                    sin6_family: libc::AF_INET6 as libc::sa_family_t,
                    sin6_port: v6.port().to_be(),
                    sin6_flowinfo: 0,
                    sin6_addr: libc::in6_addr {
                        s6_addr: v6.ip().octets(),
                    },
                    sin6_scope_id: 0,
                };
                // SAFETY: sockaddr_storage is larger than and aligned for sockaddr_in6.
                unsafe { std::ptr::write(&mut storage as *mut _ as *mut libc::sockaddr_in6, raw) };
                (size_of::<libc::sockaddr_in6>(), libc::AF_INET6)
            }
        };
        RawAddress {
            storage,
            length: length as libc::socklen_t,
            family,
        }
    }

    /// A close-on-exec TCP socket listening on this address.
    unsafe fn listen(&self) -> io::Result<RawFd> {
        // SAFETY: see `Enter::enter`.
        unsafe {
            let fd = check(libc::socket(
                self.family,
                libc::SOCK_STREAM | libc::SOCK_CLOEXEC,
                0,
            ))?;
            check(libc::bind(
                fd,
                &self.storage as *const _ as *const libc::sockaddr,
                self.length,
            ))?;
            check(libc::listen(fd, 128))?;
            Ok(fd)
        }
    }
}

fn check(result: libc::c_int) -> io::Result<libc::c_int> {
    if result < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(result)
    }
}

/// Writes `data` to a `/proc/self` file in one call.
unsafe fn write_proc(path: &std::ffi::CStr, data: &[u8]) -> io::Result<()> {
    // SAFETY: see `Enter::enter`.
    unsafe {
        let fd = check(libc::open(path.as_ptr(), libc::O_WRONLY | libc::O_CLOEXEC))?;
        let written = libc::write(fd, data.as_ptr().cast(), data.len());
        let error = io::Error::last_os_error();
        libc::close(fd);
        if written != data.len() as isize {
            return Err(error);
        }
        Ok(())
    }
}

/// Brings up `lo`, which a new network namespace starts with down.
unsafe fn loopback_up() -> io::Result<()> {
    // SAFETY: see `Enter::enter`; `ifreq` is plain data.
    unsafe {
        let fd = check(libc::socket(
            libc::AF_INET,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
        ))?;
        let mut request: libc::ifreq = std::mem::zeroed();
        for (slot, byte) in request.ifr_name.iter_mut().zip(b"lo\0") {
            *slot = *byte as libc::c_char;
        }
        let result = (|| {
            check(libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut request))?;
            request.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short;
            check(libc::ioctl(fd, libc::SIOCSIFFLAGS, &request))
        })();
        libc::close(fd);
        result.map(|_| ())
    }
}

/// Space for the control message carrying [`MAX_LISTENERS`] descriptors.
#[repr(C, align(8))]
struct ControlBuffer([u8; 128]);

/// Sends `fds` in one message over `channel` (SCM_RIGHTS).
unsafe fn send_fds(channel: RawFd, fds: &[RawFd]) -> io::Result<()> {
    // SAFETY: see `Enter::enter`; the control buffer is large and aligned enough for
    // MAX_LISTENERS descriptors.
    unsafe {
        let mut byte = [0u8; 1];
        let mut iov = libc::iovec {
            iov_base: byte.as_mut_ptr().cast(),
            iov_len: 1,
        };
        let mut control = ControlBuffer([0; 128]);
        let payload = size_of_val(fds) as libc::c_uint;
        let mut message: libc::msghdr = std::mem::zeroed();
        message.msg_iov = &mut iov;
        message.msg_iovlen = 1;
        message.msg_control = control.0.as_mut_ptr().cast();
        message.msg_controllen = libc::CMSG_SPACE(payload) as _;
        let header = libc::CMSG_FIRSTHDR(&message);
        (*header).cmsg_level = libc::SOL_SOCKET;
        (*header).cmsg_type = libc::SCM_RIGHTS;
        (*header).cmsg_len = libc::CMSG_LEN(payload) as _;
        std::ptr::copy_nonoverlapping(
            fds.as_ptr().cast::<u8>(),
            libc::CMSG_DATA(header),
            payload as usize,
        );
        let sent = libc::sendmsg(channel, &message, 0);
        if sent < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }
}

/// Receives the `count` descriptors the child sent, without waiting.
fn receive_fds(channel: RawFd, count: usize) -> io::Result<Vec<OwnedFd>> {
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec {
        iov_base: byte.as_mut_ptr().cast(),
        iov_len: 1,
    };
    let mut control = ControlBuffer([0; 128]);
    // SAFETY: msghdr is plain data; the pointers set below outlive the call.
    let mut message: libc::msghdr = unsafe { std::mem::zeroed() };
    message.msg_iov = &mut iov;
    message.msg_iovlen = 1;
    message.msg_control = control.0.as_mut_ptr().cast();
    message.msg_controllen = control.0.len() as _;
    // SAFETY: as above; MSG_CMSG_CLOEXEC marks every received descriptor close-on-exec.
    let received = unsafe {
        libc::recvmsg(
            channel,
            &mut message,
            libc::MSG_DONTWAIT | libc::MSG_CMSG_CLOEXEC,
        )
    };
    if received < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut fds = Vec::new();
    // SAFETY: the kernel filled the control buffer; the CMSG macros walk it within
    // msg_controllen, and each descriptor received is new and owned by nothing else.
    unsafe {
        let mut header = libc::CMSG_FIRSTHDR(&message);
        while !header.is_null() {
            if (*header).cmsg_level == libc::SOL_SOCKET && (*header).cmsg_type == libc::SCM_RIGHTS {
                let data = libc::CMSG_DATA(header);
                let length = (*header).cmsg_len as usize - libc::CMSG_LEN(0) as usize;
                for i in 0..length / size_of::<RawFd>() {
                    let fd = std::ptr::read_unaligned(data.cast::<RawFd>().add(i));
                    fds.push(OwnedFd::from_raw_fd(fd));
                }
            }
            header = libc::CMSG_NXTHDR(&message, header);
        }
    }
    if fds.len() != count || message.msg_flags & libc::MSG_CTRUNC != 0 {
        return Err(io::Error::other(format!(
            "the child sent {} of its {count} network listeners",
            fds.len()
        )));
    }
    Ok(fds)
}

fn socket_pair() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [-1 as RawFd; 2];
    // SAFETY: socketpair writes two new descriptors into `fds` or fails.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: both descriptors were just created and are owned by nothing else.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_proxy_lets_through_aws_hosts_on_443_and_the_configured_endpoint() {
        let policy = EgressPolicy::aws(Some("https://aws.internal.example:8443"), false);
        assert!(policy.allows("sts.us-east-1.amazonaws.com", 443));
        assert!(policy.allows("S3.AMAZONAWS.COM.", 443));
        assert!(policy.allows("ec2.cn-north-1.amazonaws.com.cn", 443));
        assert!(policy.allows("sts.us-east-1.api.aws", 443));
        assert!(policy.allows("aws.internal.example", 8443));
        for (host, port) in [
            ("sts.us-east-1.amazonaws.com", 80),
            ("amazonaws.com", 443),
            ("evilamazonaws.com", 443),
            ("amazonaws.com.evil.example", 443),
            ("attacker.example", 443),
            ("52.94.0.1", 443),
            ("aws.internal.example", 443),
            ("registry.terraform.io", 443),
        ] {
            assert!(!policy.allows(host, port), "{host}:{port} was let through");
        }
        let without_mirror = EgressPolicy::aws(None, true);
        assert!(without_mirror.allows("registry.terraform.io", 443));
        assert!(without_mirror.allows("releases.hashicorp.com", 443));
    }

    #[test]
    fn a_loopback_endpoint_is_forwarded_and_the_proxy_moves_off_its_port() {
        let policy = EgressPolicy::aws(Some("http://127.0.0.1:3128"), false);
        assert_eq!(policy.forward, vec!["127.0.0.1:3128".parse().unwrap()]);
        assert!(policy.exact.is_empty());
        assert_eq!(policy.proxy_address(), "127.0.0.1:3129".parse().unwrap());
        let localhost = EgressPolicy::aws(Some("http://localhost:5000/"), false);
        assert_eq!(localhost.forward, vec!["127.0.0.1:5000".parse().unwrap()]);
    }

    #[test]
    fn only_a_well_formed_connect_is_parsed() {
        let head =
            b"CONNECT sts.amazonaws.com:443 HTTP/1.1\r\nHost: sts.amazonaws.com:443\r\n\r\nhello";
        let ((host, port), rest) = parse_connect(head).unwrap();
        assert_eq!(
            (host.as_str(), port, rest),
            ("sts.amazonaws.com", 443, &b"hello"[..])
        );
        let ((host, _), _) = parse_connect(b"CONNECT [::1]:443 HTTP/1.1\r\n\r\n").unwrap();
        assert_eq!(host, "::1");
        for bad in [
            &b"GET http://attacker.example/ HTTP/1.1\r\n\r\n"[..],
            b"CONNECT attacker.example HTTP/1.1\r\n\r\n",
            b"CONNECT a:b HTTP/1.1\r\n\r\n",
            b"\x00\x01 garbage\r\n\r\n",
        ] {
            assert!(
                parse_connect(bad).is_err(),
                "{:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    /// Runs `script` under bash in a private network with `policy`; returns its stdout.
    async fn in_private_network(policy: EgressPolicy, script: &str) -> String {
        let dir = tempfile::tempdir().unwrap();
        let env = [("PATH".to_string(), "/usr/bin:/bin".to_string())].into();
        let spec = crate::process::ProcessSpec::new("/bin/bash", dir.path())
            .arg("-c")
            .arg(script)
            .env(env)
            .egress(policy);
        let output = crate::process::run(&spec, &tokio_util::sync::CancellationToken::new())
            .await
            .unwrap();
        assert!(output.success(), "{output:?}");
        output.stdout
    }

    /// Accepts connections and answers each with `reply`; counts them.
    async fn listener(reply: &'static [u8]) -> (SocketAddr, Arc<std::sync::atomic::AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let count = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = count.clone();
        tokio::spawn(async move {
            while let Ok((mut stream, _)) = listener.accept().await {
                counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                let _ = stream.write_all(reply).await;
            }
        });
        (address, count)
    }

    #[tokio::test]
    async fn a_child_reaches_the_forwarded_endpoint_and_nothing_else() {
        let (endpoint, endpoint_hits) = listener(b"emulator\n").await;
        let (attacker, attacker_hits) = listener(b"attacker\n").await;
        let policy = EgressPolicy::aws(Some(&format!("http://{endpoint}")), false);
        let proxy = policy.proxy_address();
        let script = format!(
            "exec 3<>/dev/tcp/{}/{} && head -n1 <&3; \
             (exec 4<>/dev/tcp/{}/{}) 2>/dev/null && echo reached-attacker || echo no-route; \
             exec 5<>/dev/tcp/{}/{} && printf 'CONNECT attacker.example:443 HTTP/1.1\\r\\n\\r\\n' >&5 && head -n1 <&5",
            endpoint.ip(),
            endpoint.port(),
            attacker.ip(),
            attacker.port(),
            proxy.ip(),
            proxy.port(),
        );
        let stdout = in_private_network(policy, &script).await;
        let lines: Vec<&str> = stdout.lines().collect();
        assert_eq!(
            lines,
            ["emulator", "no-route", "HTTP/1.1 403 Forbidden"],
            "{stdout}"
        );
        assert_eq!(endpoint_hits.load(std::sync::atomic::Ordering::SeqCst), 1);
        assert_eq!(attacker_hits.load(std::sync::atomic::Ordering::SeqCst), 0);
    }
}
