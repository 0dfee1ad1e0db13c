#!/usr/bin/env bash
# Install the Mosquitto MQTT broker for the MQTT stream test (tests/test_mqtt_stream.py, which starts
# its own broker on 127.0.0.1): the Debian `mosquitto` package when run as root, else a message and
# exit 2 (scripts/install_debian_package.sh).
exec bash "$(dirname "$0")/install_debian_package.sh" mosquitto mosquitto "the MQTT stream test (tests/test_mqtt_stream.py)"
