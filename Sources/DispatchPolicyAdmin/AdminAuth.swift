import Crypto
import Foundation

/// Who may act. Actions are off unless the admin was started with
/// `--allow-actions` and a token (`DISPATCH_POLICY_ADMIN_TOKEN`). A browser
/// signs in once with the token and gets an HttpOnly, SameSite=Strict
/// session cookie; every form carries a CSRF field bound to that session.
/// A script sends `Authorization: Bearer TOKEN` instead (no cookie, so no
/// CSRF field needed). Nothing is stored on the server: the cookie and the
/// CSRF field are HMACs of the token, so restarting the admin with another
/// token signs everyone out.
public struct AdminAuth: Sendable {
    /// The shortest token accepted (a guessable one would make the actions open).
    public static let minimumTokenLength = 16
    public static let sessionCookie = "dp_admin"

    let key: SymmetricKey?

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
        return constantTimeEqual(mac("token", key: key), mac("token", key: SymmetricKey(data: Data(token.utf8))))
    }

    /// The session cookie's value for a signed-in browser.
    public var sessionValue: String? { key.map { mac("session", key: $0) } }

    /// The CSRF field every action form carries.
    public var csrfValue: String? { key.map { mac("csrf", key: $0) } }

    public func acceptsSession(_ value: String?) -> Bool {
        guard let value, let expected = sessionValue else { return false }
        return constantTimeEqual(value, expected)
    }

    public func acceptsCSRF(_ value: String?) -> Bool {
        guard let value, let expected = csrfValue else { return false }
        return constantTimeEqual(value, expected)
    }

    private func mac(_ purpose: String, key: SymmetricKey) -> String {
        HMAC<SHA256>.authenticationCode(for: Data("dispatch-policy admin \(purpose)".utf8), using: key)
            .map { String(format: "%02x", $0) }.joined()
    }

    private func constantTimeEqual(_ a: String, _ b: String) -> Bool {
        let x = Array(a.utf8), y = Array(b.utf8)
        guard x.count == y.count else { return false }
        var difference: UInt8 = 0
        for index in x.indices { difference |= x[index] ^ y[index] }
        return difference == 0
    }
}

public enum AdminAuthError: Error, CustomStringConvertible {
    case weakToken

    public var description: String {
        switch self {
        case .weakToken: "DISPATCH_POLICY_ADMIN_TOKEN must be at least \(AdminAuth.minimumTokenLength) characters"
        }
    }
}
