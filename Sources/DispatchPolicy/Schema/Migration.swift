/// One file of `Migrations/`: `NNNN_name.sql`, applied once, in order.
public struct Migration: Sendable, Hashable {
    /// The file name, such as `0001_tables.sql`.
    public let fileName: String
    /// The file's text.
    public let sql: String

    public init(fileName: String, sql: String) {
        self.fileName = fileName
        self.sql = sql
    }

    /// The `NNNN` prefix of the file name, or nil when the name has none.
    public var version: Int? {
        let digits = fileName.prefix { $0.isASCII && $0.isNumber }
        guard !digits.isEmpty, fileName.dropFirst(digits.count).first == "_" else { return nil }
        return Int(digits)
    }

    /// The statements of the file, as sent to the server one by one.
    public var statements: [String] { SQLStatementSplitter.split(sql) }
}
