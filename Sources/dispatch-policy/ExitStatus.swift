import ArgumentParser
import DispatchPolicy
import Foundation

/// The exit statuses of the CLI, after sysexits(3), so that a supervisor
/// can tell an error that a restart may cure from one it cannot:
///
/// | status | meaning |
/// | --- | --- |
/// | 0 | done |
/// | 1 | a runtime failure: the database refused, was unreachable, or a job or policy failed |
/// | 64 | usage (EX_USAGE): an unknown flag, a malformed value, flags that exclude each other |
/// | 78 | configuration (EX_CONFIG): an unusable DATABASE_URL or PG* variables, a TLS file that cannot be used, a token that cannot be read |
enum ExitStatus {
    static let usage = ExitCode(64)
    static let configuration = ExitCode(78)

    /// The lines of the top-level `--help`.
    static let help =
        "Exit status: 0 done; 1 a runtime failure (the database, a job, a policy); 64 a usage error and 78 a configuration error (DATABASE_URL, PG* variables, TLS files, the admin token file), which a restart does not cure."
}

/// The process cannot do anything useful until its configuration changes:
/// exit 78 (EX_CONFIG), after one line (and a hint) on standard error.
struct ConfigurationError: Error {
    var error: DispatchPolicyError

    init(_ error: DispatchPolicyError) { self.error = error }

    init(_ message: String, hint: String? = nil) {
        self.error = DispatchPolicyError(code: .invalidArgument, message: message, hint: hint)
    }
}

extension ConnectionSettings {
    /// Reads the TLS files the settings name (root certificate, client
    /// certificate and key) when every session uses TLS, so that a missing
    /// or unsafe file is a configuration error at start, not a connection
    /// that fails again at every retry.
    func checkTLSFiles() throws {
        guard [SSLMode.require, .verifyCA, .verifyFull].contains(sslMode),
            hosts.contains(where: { if case .tcp = $0 { true } else { false } })
        else { return }
        _ = try tlsConfiguration()
    }
}

/// The admin's token file: `--token-file PATH`, as libpq reads a password
/// file. One trailing newline (and carriage return) is stripped; an empty
/// file is refused; so is a file that its group or others may read, unless
/// it is under `$CREDENTIALS_DIRECTORY`, which systemd makes for the
/// service alone (LoadCredential=).
enum TokenFile {
    static func read(_ path: String, environment: [String: String] = ProcessInfo.processInfo.environment) throws(ConfigurationError)
        -> String
    {
        let underCredentials =
            environment["CREDENTIALS_DIRECTORY"].map { directory in
                !directory.isEmpty
                    && URL(fileURLWithPath: path).standardizedFileURL.path.hasPrefix(
                        URL(fileURLWithPath: directory).standardizedFileURL.path + "/")
            } ?? false
        var info = stat()
        guard stat(path, &info) == 0 else {
            throw ConfigurationError("cannot read the token file \(path): \(String(cString: strerror(errno)))")
        }
        guard (info.st_mode & S_IFMT) == S_IFREG else {
            throw ConfigurationError("the token file \(path) is not a regular file")
        }
        if !underCredentials, info.st_mode & 0o077 != 0 {
            throw ConfigurationError(
                "the token file \(path) has group or world access; permissions should be u=rw (0600) or less",
                hint: "chmod 0600 \(path)")
        }
        guard let data = FileManager.default.contents(atPath: path) else {
            throw ConfigurationError("cannot read the token file \(path): \(String(cString: strerror(errno)))")
        }
        // Bytes, not characters: "\r\n" is one Character.
        var bytes = [UInt8](data)
        if bytes.last == UInt8(ascii: "\n") { bytes.removeLast() }
        if bytes.last == UInt8(ascii: "\r") { bytes.removeLast() }
        let token = String(decoding: bytes, as: UTF8.self)
        guard !token.isEmpty else {
            throw ConfigurationError("the token file \(path) is empty", hint: "openssl rand -hex 24 > \(path)")
        }
        return token
    }
}
