from twisted.application.service import ServiceMaker

labelgw = ServiceMaker("labelgw", "labelgw.cli.tap", "Reverse proxy routing by Docker container labels.", "labelgw")
