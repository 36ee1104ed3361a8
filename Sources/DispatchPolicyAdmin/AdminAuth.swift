import Crypto
import Foundation
import Synchronization

/// Who may act. Actions are off unless the admin was started with
/// `--allow-actions` and a token (`--token-file` or `DISPATCH_POLICY_ADMIN_TOKEN`). A browser
/// signs in once with the token and gets an HttpOnly, SameSite=Strict
/// session cookie that lasts ``sessionLifetime``; every form carries a CSRF
/// field bound to that session. A script sends `Authorization: Bearer
/// TOKEN` instead (no cookie, so no CSRF field needed). Nothing is stored
/// on the server: the cookie is its time of issue and an HMAC of it keyed
/// by the token, the CSRF field an HMAC of the cookie, so restarting the
/// admin with another token signs everyone out, and a copied cookie stops
/// working when it expires.
public struct AdminAuth: Sendable {
    /// The shortest token accepted (a guessable one would make the actions open).
    public static let minimumTokenLength = 16
    public static let sessionCookie = "dp_admin"
    /// How long a sign-in lasts.
    public static let sessionLifetime: Duration = .seconds(12 * 3600)
    /// A cookie issued up to this far in the future is still accepted (clocks).
    static let clockSkew: Int64 = 60

    let key: SymmetricKey?
    /// Signs the messages shown after a redirect (any key will do: one per
    /// process, so a link with a made-up message shows nothing).
    let flashKey = SymmetricKey(size: .bits256)

    /// nil: actions are off.
    public init(token: String?) throws {
        guard let token else {
            key = nil
            return
        }
        guard token.count >= Self.minimumTokenLength else {
            throw AdminAuthError.weakToken
        }
        key = SymmetricKey(data: Data(token.utf8))
    }

    public var actionsEnabled: Bool { key != nil }

    /// The token's check, in constant time.
    public func accepts(token: String) -> Bool {
        guard let key else { return false }
        return Self.constantTimeEqual(mac("token", key: key), mac("token", key: SymmetricKey(data: Data(token.utf8))))
    }

    /// The session cookie's value for a browser signing in at `now`:
    /// `ISSUED.MAC` (seconds since 1970).
    public func sessionValue(now: Date = Date()) -> String? {
        guard let key else { return nil }
        let issued = Int64(now.timeIntervalSince1970.rounded(.down))
        return "\(issued).\(mac("session \(issued)", key: key))"
    }

    /// Whether `value` is a session cookie this token issued, not expired at `now`.
    public func acceptsSession(_ value: String?, now: Date = Date()) -> Bool {
        guard let key, let value else { return false }
        let parts = value.split(separator: ".", maxSplits: 1, omittingEmptySubsequences: false)
        guard parts.count == 2, parts[0].count <= 12, parts[0].allSatisfy(\.isASCII), let issued = Int64(parts[0]) else { return false }
        let age = Int64(now.timeIntervalSince1970.rounded(.down)) - issued
        guard age >= -Self.clockSkew, age <= Self.sessionLifetime.components.seconds else { return false }
        return Self.constantTimeEqual(String(parts[1]), mac("session \(issued)", key: key))
    }

    /// The CSRF field of the forms of a signed-in session (its cookie).
    public func csrfValue(session: String) -> String? {
        key.map { mac("csrf \(session)", key: $0) }
    }

    /// Whether `value` is the CSRF field of that (valid) session.
    public func acceptsCSRF(_ value: String?, session: String?, now: Date = Date()) -> Bool {
        guard let value, let session, acceptsSession(session, now: now), let expected = csrfValue(session: session) else { return false }
        return Self.constantTimeEqual(value, expected)
    }

    /// The signature a redirect gives its message.
    public func flashSignature(_ message: String) -> String {
        mac("flash \(message)", key: flashKey)
    }

    public func acceptsFlash(_ message: String, signature: String?) -> Bool {
        guard let signature else { return false }
        return Self.constantTimeEqual(signature, flashSignature(message))
    }

    private func mac(_ purpose: String, key: SymmetricKey) -> String {
        HMAC<SHA256>.authenticationCode(for: Data("dispatch-policy admin \(purpose)".utf8), using: key)
            .map { String(format: "%02x", $0) }.joined()
    }

    static func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8)
        let y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var difference: UInt8 = 0
        for index in x.indices { difference |= x[index] ^ y[index] }
        return difference == 0
    }
}

/// Failed attempts with a wrong token (sign-ins, bearer tokens) allowed per
/// client and window: past them, that client gets 429 until the window
/// ends, even with the right token. A token of 16 characters or more cannot
/// be guessed at this pace; the limit keeps a script from trying, and the
/// log from filling. A client is its IP address: behind a proxy all clients
/// share the proxy's, and one of them can keep the others from signing in.
/// Signed-in sessions are not affected. At most `maxClients` clients are
/// tracked (the oldest forgotten first).
public final class SignInLimiter: Sendable {
    public let maxFailures: Int
    public let window: Duration
    public let maxClients: Int
    private let failures = Mutex<[String: [ContinuousClock.Instant]]>([:])

    public init(maxFailures: Int = 10, window: Duration = .seconds(60), maxClients: Int = 10_000) {
        self.maxFailures = maxFailures
        self.window = window
        self.maxClients = maxClients
    }

    /// nil: the client may try; else how long until it may.
    public func retryAfter(client: String, now: ContinuousClock.Instant = .now) -> Duration? {
        failures.withLock { all in
            guard var list = all[client] else { return nil }
            list.removeAll { now - $0 >= window }
            all[client] = list.isEmpty ? nil : list
            guard list.count >= maxFailures, let oldest = list.first else { return nil }
            return window - (now - oldest)
        }
    }

    public func recordFailure(client: String, now: ContinuousClock.Instant = .now) {
        failures.withLock { all in
            if all[client] == nil, all.count >= maxClients {
                // Forget the clients whose failures are all outside the window, else the one that failed longest ago.
                all = all.filter { $0.value.contains { now - $0 < window } }
                if all.count >= maxClients, let oldest = all.min(by: { ($0.value.last ?? now) < ($1.value.last ?? now) })?.key {
                    all[oldest] = nil
                }
            }
            var list = all[client, default: []]
            list.removeAll { now - $0 >= window }
            list.append(now)
            all[client] = list
        }
    }
}

public enum AdminAuthError: Error, CustomStringConvertible {
    case weakToken

    public var description: String {
        switch self {
        case .weakToken: "the admin token must be at least \(AdminAuth.minimumTokenLength) characters"
        }
    }
}
