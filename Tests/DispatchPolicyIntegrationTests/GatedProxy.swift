import DispatchPolicy
import Foundation
import Synchronization

/// A TCP proxy on 127.0.0.1 in front of a test server that holds every
/// connection it accepts until ``open()``: a client's connection attempt
/// then completes exactly when a test says so (late, after its caller gave
/// up). Blocking sockets on threads of their own; test use only.
final class GatedProxy: Sendable {
    let port: Int
    private let listener: Int32
    private let target: ConnectionSettings.Endpoint
    private struct State {
        var open = false
        var waiting: [Int32] = []
        var accepted = 0
        var ended = 0
        var stopped = false
    }
    private let state = Mutex(State())

    init(to target: ConnectionSettings.Endpoint) throws {
        self.target = target
        let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
        var address = sockaddr_in()
        address.sin_family = sa_family_t(AF_INET)
        address.sin_addr.s_addr = inet_addr("127.0.0.1")
        let bound = withUnsafePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { bind(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
        }
        guard fd >= 0, bound == 0, listen(fd, 16) == 0 else { throw POSIXError(.EADDRNOTAVAIL) }
        var length = socklen_t(MemoryLayout<sockaddr_in>.size)
        _ = withUnsafeMutablePointer(to: &address) {
            $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { getsockname(fd, $0, &length) }
        }
        listener = fd
        port = Int(UInt16(bigEndian: address.sin_port))
        Thread.detachNewThread { [self] in acceptLoop() }
    }

    /// Connections accepted so far, and those whose both directions ended.
    var accepted: Int { state.withLock { $0.accepted } }
    var ended: Int { state.withLock { $0.ended } }

    /// Forwards the connections held so far and every later one.
    func open() {
        let held = state.withLock { state in
            state.open = true
            defer { state.waiting = [] }
            return state.waiting
        }
        for client in held { forward(client) }
    }

    func stop() {
        state.withLock { $0.stopped = true }
        shutdown(listener, Int32(SHUT_RDWR))
        close(listener)
    }

    private func acceptLoop() {
        while true {
            let client = accept(listener, nil, nil)
            if client < 0 { return }
            let forwardNow = state.withLock { state in
                state.accepted += 1
                if !state.open { state.waiting.append(client) }
                return state.open
            }
            if forwardNow { forward(client) }
        }
    }

    private func forward(_ client: Int32) {
        let server = connectToTarget()
        guard server >= 0 else {
            close(client)
            state.withLock { $0.ended += 1 }
            return
        }
        let halves = Mutex(0)
        for (from, to) in [(client, server), (server, client)] {
            Thread.detachNewThread { [self] in
                var buffer = [UInt8](repeating: 0, count: 16_384)
                while true {
                    let n = buffer.withUnsafeMutableBytes { read(from, $0.baseAddress, $0.count) }
                    if n <= 0 { break }
                    var sent = 0
                    while sent < n {
                        let w = buffer.withUnsafeBytes { write(to, $0.baseAddress! + sent, n - sent) }
                        if w <= 0 { break }
                        sent += w
                    }
                    if sent < n { break }
                }
                shutdown(to, Int32(SHUT_WR))
                if halves.withLock({
                    $0 += 1
                    return $0
                }) == 2 {
                    close(client)
                    close(server)
                    state.withLock { $0.ended += 1 }
                }
            }
        }
    }

    private func connectToTarget() -> Int32 {
        switch target {
        case .tcp(let host, let port):
            let fd = socket(AF_INET, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_in()
            address.sin_family = sa_family_t(AF_INET)
            address.sin_addr.s_addr = inet_addr(host == "localhost" ? "127.0.0.1" : host)
            address.sin_port = UInt16(port).bigEndian
            let ok = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_in>.size)) }
            }
            if ok != 0 {
                close(fd)
                return -1
            }
            return fd
        case .unixSocket(let path):
            let fd = socket(AF_UNIX, Int32(SOCK_STREAM.rawValue), 0)
            var address = sockaddr_un()
            address.sun_family = sa_family_t(AF_UNIX)
            let bytes = Array(path.utf8)
            guard bytes.count < MemoryLayout.size(ofValue: address.sun_path) else {
                close(fd)
                return -1
            }
            withUnsafeMutableBytes(of: &address.sun_path) { raw in
                for (i, byte) in bytes.enumerated() { raw[i] = byte }
                raw[bytes.count] = 0
            }
            let ok = withUnsafePointer(to: &address) {
                $0.withMemoryRebound(to: sockaddr.self, capacity: 1) { connect(fd, $0, socklen_t(MemoryLayout<sockaddr_un>.size)) }
            }
            if ok != 0 {
                close(fd)
                return -1
            }
            return fd
        }
    }
}
