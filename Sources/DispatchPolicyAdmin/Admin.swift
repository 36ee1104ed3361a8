import Hummingbird
import Mustache
import Prometheus
