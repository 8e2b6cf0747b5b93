"""fedguard.stack.free_port: ports a stack takes seconds before it binds them must not be ones the kernel hands to
anyone else meanwhile (CI once found the Prometheus port, picked by bind(0), listened on by then)."""

from __future__ import annotations

import socket

from fedguard import stack


def test_the_range_lies_below_the_ephemeral_range_and_above_the_privileged_ports():
    assert stack.free_port_range(32768) == range(16384, 32767)
    assert stack.free_port_range(10000) == range(1024, 9999)
    assert stack.free_port_range(1030)[0] == 1024 and len(stack.free_port_range(1030)) >= 1


def test_the_ephemeral_bound_is_read_from_the_kernel_setting_with_the_linux_default_if_unreadable(tmp_path):
    setting = tmp_path / "ip_local_port_range"
    setting.write_text("40000\t60999\n")
    assert stack.ephemeral_port_low(str(setting)) == 40000
    setting.write_text("")
    assert stack.ephemeral_port_low(str(setting)) == 32768
    assert stack.ephemeral_port_low(str(tmp_path / "missing")) == 32768


def test_ports_are_free_outside_the_ephemeral_range_and_never_repeat():
    low = stack.ephemeral_port_low()
    ports = [stack.free_port() for _ in range(50)]
    assert len(set(ports)) == 50
    assert all(port in stack.free_port_range(low) for port in ports)
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # nothing holds it


def test_a_port_something_listens_on_is_never_handed_out(monkeypatch):
    real_choice = stack._port_picker.choice
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", stack.free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        stack._ports_handed_out.discard(taken)
        offers = iter([taken, taken])
        monkeypatch.setattr(stack._port_picker, "choice",
                            lambda candidates: next(offers, None) or real_choice(candidates))
        assert stack.free_port() != taken


def test_a_span_gives_consecutive_free_ports_none_of_which_is_handed_out_again():
    base = stack.free_port(span=3)
    assert {base, base + 1, base + 2} <= stack._ports_handed_out
    for port in range(base, base + 3):
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
    assert not {stack.free_port() for _ in range(30)} & {base, base + 1, base + 2}


def test_with_no_room_below_the_ephemeral_range_the_kernel_offers_ports(monkeypatch):
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", stack.free_port()))
        listener.listen()
        taken = listener.getsockname()[1]
        monkeypatch.setattr(stack, "ephemeral_port_low", lambda: 1025)
        monkeypatch.setattr(stack._port_picker, "choice", lambda candidates: taken)
        port = stack.free_port()
        assert port != taken and port not in stack.free_port_range(1025)
